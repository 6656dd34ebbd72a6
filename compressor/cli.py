"""The ``compress`` command: options, progress and messages; the work is in ``compressor.pipeline``.

Only click and the settings are imported here, so that ``compress --help`` answers at once; torch, transformers
and the families are imported by the command that needs them.

Exit status: 0 done; 1 an error, said in one sentence; 2 a usage error (an unknown option or a malformed value,
click's convention); 130 interrupted by Ctrl-C, 143 by SIGTERM (nothing half-written is left either way).
"""

from __future__ import annotations

import shlex
import signal
import sys
import warnings
from dataclasses import fields
from functools import wraps
from pathlib import Path

import click

from . import interrupts
from .calibration_text import check_source
from .errors import CompressorError
from .model_source import local_folder_of, locate_model
from .outputs import check_output, scratch_folder
from .preflight import check_eval_inputs, check_prune_inputs, check_pruned_folder, check_teacher_location
from .settings import (BUDGETS, DEFAULT_STATE_REDUCTION, DEVICE_MAPS, DTYPE_CHOICES, EXPORTS, KEY_METHODS, LAYOUTS,
                       PACKINGS, PRUNE_METHODS, REMOVE, SCORE_METHODS, STEP_CHOICES, CalibrationSettings, EvalSettings,
                       PruneSettings, check_memory_sizes)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
CALIBRATION_FIELDS = tuple(f.name for f in fields(CalibrationSettings))


class ShareOrAuto(click.ParamType):
    """A float, or the word ``auto``."""

    name = "share"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'.", param, ctx)


SHARE_OR_AUTO = ShareOrAuto()
MAX_GPU_MEMORY_HELP = ("Most weights the GPU may hold (e.g. 40GB): a larger model is calibrated one decoder layer at "
                       "a time from its files{}. Leave room beside them for calibration's working set (chunk states "
                       "and spectra, growing with --batch-size and --seq-len).")


def user_errors(command):
    """A CompressorError, or an OSError of the file system (no space, no permission), becomes one sentence on
    stderr and exit status 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressorError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            where = f" ({error.filename})" if error.filename else ""
            raise click.ClickException(f"{error.strerror or error}{where}.") from None

    return wrapper


def calibration_options(command):
    """The options of ``CalibrationSettings``, shared by analyze and prune."""
    options = [
        click.option("--calib", default=None, metavar="FILE|DIR|FILE.jsonl|hf:ID|text:…",
                     help="Calibration text: a file, a folder of .txt/.md/.rst files, a .jsonl file (one document "
                          "per line), hf:DATASET[:CONFIG] (a Hub dataset, streamed; needs the datasets extra), or "
                          "text:LITERAL [default: the embedded Python-docs text]."),
        click.option("--text-field", default="text", show_default=True,
                     help="Field of a .jsonl file, or column of a Hub dataset, that holds the text."),
        click.option("--split", default="train", show_default=True, help="Split of a Hub dataset."),
        click.option("--packing", default="pack", show_default=True, type=click.Choice(PACKINGS),
                     help="pack: join documents and cut windows across them; truncate: one window per document "
                          "(its first --seq-len tokens; shorter documents are skipped)."),
        click.option("--every", default=64, show_default=True,
                     help="Tokens between measured states (a multiple of 64); fewer steps, fewer spectra."),
        click.option("--steps", default="every", show_default=True, type=click.Choice(STEP_CHOICES),
                     help="every: a state every --every tokens; log: at 64, 128, 256, ... tokens (and the last)."),
        click.option("--samples", default=16, show_default=True, help="Calibration sequences."),
        click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration sequence."),
        click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass."),
        click.option("--seed", default=0, show_default=True, help="Seed for choosing windows."),
        click.option("--eps", default=1e-4, show_default=True, help="Threshold rank: count σ_i > eps·σ_1."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
                     help="Compute dtype (auto: the checkpoint's on GPU, float32 on CPU). Weights are saved in "
                          "the checkpoint's dtype."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def calibration_settings(options: dict) -> CalibrationSettings:
    """Take the calibration options out of a command's ``options``."""
    return CalibrationSettings(**{name: options.pop(name) for name in CALIBRATION_FIELDS})


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="compressor")
def main():
    """Prune linear-attention heads chosen from how their recurrent states behave on calibration text.

    Exit status: 0 done, 1 an error (one sentence), 2 a usage error, 130/143 interrupted.
    """


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for stats.safetensors, report.json, report.md and figures [default: print a summary only].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of compressor in --out.")
@calibration_options
@click.option("--max-gpu-memory", default=None, metavar="SIZE", help=MAX_GPU_MEMORY_HELP.format(""))
@click.option("--max-cpu-memory", default=None, metavar="SIZE", help="As --max-gpu-memory, when computing on the CPU.")
@click.option("--device-map", default=None, type=click.Choice(DEVICE_MAPS),
              help="Spread the decoder layers over every visible GPU with accelerate, as prune does.")
@user_errors
def analyze(model, out_dir, overwrite, max_gpu_memory, max_cpu_memory, device_map, **options):
    """Measure every head's state rank and norm over time on calibration text (MODEL: folder or Hub id)."""
    device, dtype = options.pop("device"), options.pop("dtype")
    calibration = calibration_settings(options)
    calibration.check()  # before the pipeline's imports: quick refusals, in the pipeline's order
    check_memory_sizes(max_gpu_memory, max_cpu_memory)
    if out_dir is not None:
        check_output(out_dir, overwrite, [local_folder_of(model)])
    check_source(calibration.calib, calibration.text_field)
    locate_model(model)
    from .pipeline import analyze as run_analyze

    stats = run_analyze(model, calibration, out_dir, device, dtype, overwrite=overwrite,
                        max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, device_map=device_map)
    ranks = stats.per_layer("threshold_rank")
    for i, layer in enumerate(stats.layers):
        shown = " ".join(f"{r:5.1f}" for r in ranks[layer].tolist())
        bound = min(stats.state_shapes[i])
        click.echo(f"layer {layer:3d}  mean threshold rank of each head (at most {bound} = min(d_k, d_v)):  {shown}")
    if out_dir is not None:
        click.echo(f"wrote {out_dir / 'stats.safetensors'} and the report {out_dir / 'report.md'}")


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (required unless --dry-run).")
@click.option("--state-reduction", default=None, type=float,
              help=f"Remove heads until the recurrent state shrinks by at least this share (0 < R < 1) "
                   f"[default: {DEFAULT_STATE_REDUCTION}].")
@click.option("--method", default="auto", show_default=True, type=click.Choice(PRUNE_METHODS),
              help="auto: try every rule at both ends and keep the lowest loss on held-out calibration windows. "
                   "Or one score: joint rank-norm (the paper's Eq. 14; its rule is --method joint --remove high); "
                   "threshold rank, stable_rank, entropy_rank; nuclear norm, frobenius; random; loss (each head's "
                   "own loss increase when masked alone, on --loss-samples x --loss-seq-len calibration tokens).")
@click.option("--key-reduction", default=None, type=SHARE_OR_AUTO, metavar="R|auto",
              help="Also remove this share (0 < R < 1) of every key head's query/key channels (the same count in "
                   "every key head); with --state-reduction, heads go until the state shrinks by that share in all. "
                   "auto: heads alone, channels alone, or half of --state-reduction each, whichever gives the "
                   "lowest loss on the --auto-holdout windows.")
@click.option("--key-method", default="auto", show_default=True, type=click.Choice(KEY_METHODS),
              help="How --key-reduction chooses each key head's channels: rrqr (strong rank-revealing QR of "
                   "calibration queries and keys), l1 or wanda (projection rows), taylor (loss gradient of a channel "
                   "mask, backward passes through the PyTorch recurrences), random; auto: each of them, "
                   "keeping the lowest loss on the --auto-holdout windows.")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of rank in the joint score.")
@click.option("--remove", default=None, type=click.Choice(REMOVE),
              help="With a score: remove its highest (the paper's rule) or lowest values [default: low, the better "
                   "end on every model measured]. auto measures both.")
@click.option("--min-heads-per-layer", default=1, show_default=True, help="Heads every layer keeps.")
@click.option("--budget", default="global", show_default=True, type=click.Choice(BUDGETS),
              help="global: remove heads in score order across the model until --state-reduction is reached; "
                   "uniform: remove the same share of heads in every (unprotected) layer.")
@click.option("--layout", default="free", show_default=True, type=click.Choice(LAYOUTS),
              help="free: any heads per layer (a per-layer config and shipped code, trust_remote_code); stock: the "
                   "same key and value heads in every layer, in the stock grouping, so that stock transformers and "
                   "engines that read one head count load it (coarser: it may remove more than --state-reduction).")
@click.option("--heads-per-layer", default=None, metavar="SPEC",
              help="Instead of --state-reduction: heads to keep per layer, as 0:6,1:4 or a JSON file "
                   "{\"0\": 6, \"1\": 4}; unlisted layers keep every head.")
@click.option("--protect-layers", default="", metavar="LAYERS", help="Layers never pruned, as 0,3.")
@click.option("--loss-samples", default=2, show_default=True,
              help="With --method loss or auto: calibration windows the loss scorer masks each head on.")
@click.option("--loss-seq-len", default=256, show_default=True, help="Tokens per loss-scorer window.")
@click.option("--loss-batch-size", default=16, show_default=True,
              help="Sequences per loss-scorer forward pass; each masks one head.")
@click.option("--auto-holdout", default=0.25, show_default=True,
              help="With --method auto: share of the calibration windows held out to compare the rules.")
@click.option("--stats", type=click.Path(path_type=Path), default=None,
              help="Reuse statistics written by `compress analyze --out` instead of calibrating (where heads are "
                   "removed, needs a --method other than auto).")
@calibration_options
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
              help="Text file for held-out perplexity and copy recall before and after.")
@click.option("--eval-samples", default=None, type=int,
              help="Evaluation sequences [default: every whole window of the file].")
@click.option("--eval-seq-len", default=1024, show_default=True, help="Tokens per evaluation sequence.")
@click.option("--dry-run", is_flag=True, help="Print the plan and sizes; write nothing.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Reload the written folder and compare logits with the in-memory pruned model.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of compressor in --out.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--max-gpu-memory", default=None, metavar="SIZE",
              help=MAX_GPU_MEMORY_HELP.format(" and exported shard by shard"))
@click.option("--max-cpu-memory", default=None, metavar="SIZE", help="As --max-gpu-memory, when computing on the CPU.")
@click.option("--device-map", default=None, type=click.Choice(DEVICE_MAPS),
              help="Spread the decoder layers over every visible GPU with accelerate (auto/balanced: evenly; "
                   "sequential: one GPU after another), within --max-gpu-memory each, instead of --device.")
@click.option("--export", default="memory", show_default=True, type=click.Choice(EXPORTS),
              help="Write the weights from the pruned model in memory, or stream them shard by shard from the "
                   "source's safetensors files (a local folder; same tensors, one shard in memory at a time).")
@click.option("--base-model", default=None, metavar="ID",
              help="Hub id the model card names as base_model [default: the source's id, or its Hub cache path's].")
@click.option("--push-to-hub", default=None, metavar="REPO_ID", help="Push the folder when done.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option("--heal", "heal_tokens", default=None, type=int, metavar="TOKENS",
              help="Then distil MODEL into the pruned model on this many tokens of the calibration text "
                   "(`compress heal` with its defaults) and write the healed model to --out.")
@user_errors
def prune(model, out_dir, eval_path, eval_samples, eval_seq_len, heal_tokens, **options):
    """Remove linear-attention heads and write a smaller checkpoint (MODEL: folder or Hub id)."""
    evaluation = EvalSettings(eval_path, eval_samples, eval_seq_len)
    evaluation.check("--eval-")  # also when --eval is not given: a bad value is a mistake either way
    settings = PruneSettings(calibration=calibration_settings(options), evaluation=evaluation if eval_path else None,
                             **options)
    check_prune_inputs(local_folder_of(model), out_dir, settings)  # before the pipeline's imports: quick refusals
    if settings.stats is not None:
        refuse_unread_calibration_options(click.get_current_context(), settings, heal_tokens is not None)
    locate_model(model)
    from .pipeline import prune as run_prune

    command = command_line(click.get_current_context())
    if heal_tokens is not None:
        return prune_and_heal(model, out_dir, settings, evaluation, heal_tokens, command)
    result = run_prune(model, out_dir, settings, command=command)
    click.echo(summary(result.record, settings.asked_state_reduction))
    if settings.dry_run:
        click.echo("dry run: nothing written")
    if result.out_dir is not None:
        click.echo(f"wrote {result.out_dir}")
    if result.pushed is not None:
        click.echo(f"pushed: {result.pushed}")


def refuse_unread_calibration_options(ctx: click.Context, settings: PruneSettings, heals: bool) -> None:
    """With ``--stats`` the statistics' own options (``--every``, ``--steps``, ``--eps``) are not read, nor, where
    nothing else reads the calibration text (``settings.reads_calibration_text``), the text's options (but those
    healing trains on, with ``heals``): an option typed then would be ignored, so it is refused (``--seed``,
    ``--device`` and ``--dtype`` still apply)."""
    unread = ["every", "steps", "eps"]
    if not settings.reads_calibration_text:
        unread += ["packing", "samples", "seq_len", "batch_size"] + ([] if heals else ["calib", "text_field", "split"])
    for name in unread:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            option = "--" + name.replace("_", "-")
            raise CompressorError(f"{option} has no effect with --stats, whose statistics `compress analyze` "
                                  f"measured and recorded with their calibration; drop {option}.")


def prune_and_heal(model: str, out_dir: Path | None, settings: PruneSettings, evaluation: EvalSettings,
                   tokens: int, command: str) -> None:
    """``prune --heal``: prune into a temporary folder beside --out, heal it from MODEL into --out, push it."""
    from .heal import HealSettings, heal_folder
    from .pipeline import prune as run_prune

    calibration = settings.calibration
    heal_settings = HealSettings(tokens=tokens, calib=calibration.calib, text_field=calibration.text_field,
                                 split=calibration.split, seed=calibration.seed, device=settings.device,
                                 eval_path=None if evaluation.path is None else str(evaluation.path),
                                 eval_samples=evaluation.samples, eval_seq_len=evaluation.seq_len,
                                 verify=settings.verify)
    heal_settings.check()
    if settings.dry_run or out_dir is None:
        raise CompressorError("--heal trains and writes the pruned model; it needs --out and no --dry-run.")
    check_output(out_dir, settings.overwrite, [local_folder_of(model)])
    push, settings.push_to_hub = settings.push_to_hub, None
    with scratch_folder(out_dir, "unhealed") as folder:
        result = run_prune(model, folder / "pruned", settings, command=command)
        click.echo(summary(result.record, settings.asked_state_reduction))
        record = heal_folder(result.out_dir, model, out_dir, heal_settings, overwrite=settings.overwrite,
                             command=command)
    echo_recovery(record, out_dir)
    if push is not None:
        from .hub import push_written

        click.echo(f"pushed: {push_written(out_dir, push, private=settings.private)}")


@main.command(context_settings=CONTEXT)
@click.argument("config", metavar="CONFIG")
@click.option("--stats", required=True, type=click.Path(path_type=Path),
              help="Statistics written by `compress analyze --out` for this model.")
@click.option("--state-reduction", default=None, type=float, help=f"As prune [default: {DEFAULT_STATE_REDUCTION}].")
@click.option("--budget", default="global", show_default=True, type=click.Choice(BUDGETS), help="As prune.")
@click.option("--heads-per-layer", default=None, metavar="SPEC", help="As prune.")
@click.option("--protect-layers", default="", metavar="LAYERS", help="As prune.")
@click.option("--min-heads-per-layer", default=1, show_default=True, help="As prune.")
@click.option("--layout", default="free", show_default=True, type=click.Choice(LAYOUTS), help="As prune.")
@click.option("--method", default="norm", show_default=True, type=click.Choice(SCORE_METHODS),
              help="A statistics score (loss and auto need the weights).")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of rank in the joint score.")
@click.option("--remove", default=None, type=click.Choice(REMOVE), help="As prune [default: low].")
@click.option("--seed", default=0, show_default=True, help="Seed of --method random.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@user_errors
def plan(config, stats, seed, **options):
    """The plan, sizes and output shards of pruning the model of CONFIG (a config.json, or a folder holding one)
    with saved statistics, without its weights."""
    from .loading import load_structure
    from .pipeline import prune as run_prune
    from .planning import output_shards

    settings = PruneSettings(stats=stats, dry_run=True, calibration=CalibrationSettings(seed=seed), **options)
    loaded = load_structure(config)
    result = run_prune(loaded, None, settings, progress=False)
    click.echo(summary(result.record, settings.asked_state_reduction))
    shards = output_shards(loaded, result.plan, settings.max_shard_size)
    click.echo(f"output: {len(shards)} shard(s) of {', '.join(f'{size / 2**30:.2f}' for size in shards)} GiB "
               f"({sum(shards) / 2**30:.2f} GiB of weights)")


@main.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--eval", "path", type=click.Path(path_type=Path), default=None,
              help="Text file to measure on [default: the embedded held-out Python-docs text].")
@click.option("--samples", default=None, type=int, help="Evaluation sequences [default: every whole window].")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per evaluation sequence.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="Compute dtype (auto: the checkpoint's on GPU, float32 on CPU).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the figures here.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier --json file of compress eval.")
@click.option("--device-map", default=None, type=click.Choice(DEVICE_MAPS),
              help="Spread the decoder layers over every visible GPU with accelerate, as prune does.")
@user_errors
def evaluate(model, path, samples, seq_len, batch_size, device, dtype, json_path, overwrite, device_map):
    """Perplexity and copy-recall accuracy of MODEL (folder, prune output or Hub id)."""
    settings = EvalSettings(path, samples, seq_len, batch_size)
    check_eval_inputs(settings, json_path, overwrite)
    locate_model(model)
    from .quality import evaluate as run_evaluate

    figures = run_evaluate(model, settings, device, dtype, json_path, overwrite=overwrite, device_map=device_map)
    click.echo(f"perplexity: {figures['perplexity']:.2f} on {figures['windows']} x {figures['seq_len']} tokens of "
               f"{figures['data']}")
    click.echo(f"copy-recall accuracy: {figures['recall_accuracy']:.1%} ({figures['recall_probe']})")
    if json_path is not None:
        click.echo(f"wrote {json_path}")


def _refuse_force(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``push --force``, which did two jobs: a usage error naming both flags that replaced it (click alone would
    suggest ``--replace``, the one that overwrites another model)."""
    if value:
        raise click.UsageError("--force is now two flags: --unverified (a folder prune did not write or verify) and "
                               "--replace (a repo that holds another model's files).")


@main.command(context_settings=CONTEXT)
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to push to.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login]; never printed.")
@click.option("--endpoint", default=None, help="Hub endpoint [default: huggingface.co].")
@click.option("--unverified", is_flag=True, help="Push a folder that prune did not write, or whose reload check "
              "failed or never ran.")
@click.option("--replace", is_flag=True, help="Push into a repo that holds files compressor did not push (another "
              "model): they are replaced, and its safetensors shards deleted.")
@click.option("--force", is_flag=True, hidden=True, expose_value=False, callback=_refuse_force)
@user_errors
def push(folder, repo_id, private, revision, create_pr, token, endpoint, unverified, replace):
    """Upload a pruned FOLDER to the Hugging Face Hub as REPO_ID."""
    from .hub import push_folder

    url = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr, token=token,
                      endpoint=endpoint, unverified=unverified, replace=replace)
    click.echo(f"pushed: {url}")


def command_line(ctx: click.Context) -> str:
    """The command as the user gave it (options given on the command line only), for the model card."""
    words = ["compress", ctx.info_name]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def summary(record, asked: float | None = None) -> str:
    """A per-layer plan and the before/after sizes of a ``CompressionRecord``, as printed by prune (``asked``: the
    share of the state the options asked to remove, printed beside the share removed)."""
    lines = []
    method = record.method
    for candidate in method.candidates or []:
        end = f" (seed {candidate['seed']})" if candidate["name"] == "random" else f", remove {candidate['remove']}"
        lines.append(f"auto candidate {candidate['name']}{end}: held-out perplexity {candidate['perplexity']:.2f}")
    if method.chosen is not None:
        end = f" (seed {method.chosen_seed})" if method.chosen == "random" else f", remove {method.remove}"
        lines.append(f"auto chose {method.chosen}{end}")
    lines.append(f"{'layer':>5}  {'heads':>11}  kept value heads")
    for layer, info in record.layers.items():
        lines.append(f"{layer:>5}  {info.heads_before:>4} -> {len(info.kept_heads):<4}  {info.kept_heads}")
    heads_before = sum(info.heads_before for info in record.layers.values())
    removed = heads_before - sum(len(info.kept_heads) for info in record.layers.values())
    alone = (" (--key-reduction alone removes query/key channels; add --state-reduction to remove heads as well)"
             if removed == 0 and method.key_reduction not in (None, "auto") and not method.axes_chosen else "")
    lines.append(f"{'all':>5}  {heads_before:>4} -> {heads_before - removed:<4}  {removed} of {heads_before} "
                 f"value heads removed{alone}")
    if method.axes_candidates:
        lines.append("--key-reduction auto, held-out perplexity: " + ", ".join(
            f"{c['axes']}" + (f" (channels {c['key_reduction']:.3g})" if c["key_reduction"] else "")
            + f" {c['perplexity']:.2f}" for c in method.axes_candidates)
            + f"; chose {method.axes_chosen}")
    if method.key_candidates:
        lines.append("--key-method auto, held-out perplexity: " + ", ".join(
            f"{c['method']} {c['perplexity']:.2f}" for c in method.key_candidates) + f"; chose {method.key_chosen}")
    if method.key_reduction is not None:
        lines.append(f"query/key channels per key head: {method.key_dim_before} -> {method.key_dim_after} "
                     f"(--key-method {method.key_chosen or method.key_method}); kept channels of each kept key head:")
        for layer, info in record.layers.items():
            for key, kept in info.kept_key_channels.items():
                lines.append(f"{layer:>5}  key head {key}: {kept}")
    before, after = record.state_bytes_before, record.state_bytes_after
    asked = "" if asked is None else f"; asked: {asked:.1%}"
    lines.append(f"recurrent state per sequence: {before:,} -> {after:,} bytes ({1 - after / before:.1%} smaller"
                 f"{asked})")
    lines.append(f"parameters: {record.params_before:,} -> {record.params_after:,}")
    if record.method.budget == "uniform" and removed:
        lines.append("budget: uniform (the same share of heads in every layer, whole heads each, so it may remove "
                     "more than asked; --budget global spreads the heads by score)")
    if record.layout == "stock":
        lines.append("layout: stock (the same heads in every layer: a stock config, no shipped code; coarser steps "
                     "than --layout free, so it may remove more than asked)")
    if record.eval is not None:
        lines.append(f"perplexity: {record.eval.perplexity_before:.2f} -> {record.eval.perplexity_after:.2f}")
        lines.append(f"copy-recall accuracy: {record.eval.recall_accuracy_before:.1%} -> "
                     f"{record.eval.recall_accuracy_after:.1%}")
    if record.verify is not None:
        lines.append(f"verified: reloaded logits differ by {record.verify.max_abs_logit_diff:.3g}")
    return "\n".join(lines)


def run() -> None:
    """:func:`main` with Ctrl-C and SIGTERM turned into one line and exit status 128 + the signal's number, after
    every ``with`` block on the way out has cleaned up (``interrupts.py``)."""
    interrupts.install()
    # fla warns on import when Triton has no GPU; compressor keeps CPU tensors away from Triton anyway.
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
    try:
        code = main(standalone_mode=False)
    except Exception as error:
        if isinstance(error, click.exceptions.Abort) or interrupts.received:  # Abort: click's form of Ctrl-C
            interrupts.exit_interrupted(interrupts.received[0] if interrupts.received else signal.SIGINT)
        if not isinstance(error, click.ClickException):
            raise
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt as error:
        interrupts.exit_interrupted(getattr(error, "signum", signal.SIGINT))
    sys.exit(code if isinstance(code, int) else 0)


# compress heal (compressor/heal/) --------------------------------------------------------------------------


@main.command("heal", context_settings=CONTEXT)
@click.argument("pruned_dir", metavar="PRUNED", type=click.Path(path_type=Path))
@click.option("--teacher", required=True, metavar="SOURCE",
              help="The unpruned source model (folder or Hub id): same architecture and tokenizer as PRUNED.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--tokens", default=1_000_000, show_default=True, help="Training tokens.")
@click.option("--train", "train_group", default="all", show_default=True, type=click.Choice(["linear", "all"]),
              help="Parameters trained: the linear-attention layers only, or all.")
@click.option("--lora-rank", default=0, show_default=True,
              help="> 0: LoRA adapters of this rank on the --train group's linear layers, merged before writing; "
                   "0: full fine-tuning of the group.")
@click.option("--data", default="calib", show_default=True, type=click.Choice(["calib", "teacher"]),
              help="calib: windows of --calib text; teacher: text sampled from the teacher.")
@click.option("--calib", default=None, metavar="FILE|DIR|FILE.jsonl|hf:ID|text:…",
              help="Calibration text (training data with --data calib; held-out windows in any case) "
                   "[default: the embedded Python-docs text].")
@click.option("--text-field", default="text", show_default=True, help="Field of a .jsonl file or Hub dataset.")
@click.option("--split", default="train", show_default=True, help="Split of a Hub dataset.")
@click.option("--lr", default=1e-4, show_default=True, help="Peak learning rate (AdamW, warm-up, cosine decay).")
@click.option("--lm-weight", default=0.0, show_default=True,
              help="Weight of the next-token loss added to the KL to the teacher.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per training step.")
@click.option("--held-out", default=8, show_default=True, help="Calibration windows held out to track the KL.")
@click.option("--curve-points", default=8, show_default=True,
              help="Times the held-out KL is measured while training (recorded as the curve).")
@click.option("--teacher-top-k", default=None, type=int,
              help="Run the teacher first and cache its top-k log-probabilities to disk (6·k bytes per token) "
                   "instead of running it beside the student: for a teacher that does not fit beside it.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
              help="Text for held-out perplexity before and after [default: the embedded evaluation text].")
@click.option("--eval-samples", default=None, type=int, help="Evaluation windows [default: every whole one].")
@click.option("--eval-seq-len", default=1024, show_default=True, help="Tokens per evaluation window.")
@click.option("--seed", default=0, show_default=True, help="Seed for the data order, sampling and LoRA.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier output of compressor in --out.")
@user_errors
def heal(pruned_dir, teacher, out_dir, tokens, train_group, lora_rank, data, calib, text_field, split, lr, lm_weight,
         seq_len, batch_size, held_out, curve_points, teacher_top_k, eval_path, eval_samples, eval_seq_len, seed, device,
         overwrite):
    """Distil the unpruned TEACHER into a PRUNED folder (KL on next-token distributions) and write it to --out."""
    from .heal import HealSettings, heal_folder

    settings = HealSettings(
        tokens=tokens, train=train_group, lora_rank=lora_rank, data=data, calib=calib, text_field=text_field,
        split=split, lr=lr, lm_weight=lm_weight, seq_len=seq_len, batch_size=batch_size, held_out=held_out,
        curve_points=curve_points, teacher_top_k=teacher_top_k, eval_path=None if eval_path is None else str(eval_path),
        eval_samples=eval_samples, eval_seq_len=eval_seq_len, seed=seed, device=device,
    )
    settings.check()  # before torch and transformers are imported: quick refusals, in heal's order
    check_pruned_folder(pruned_dir)
    check_output(out_dir, overwrite, [pruned_dir, Path(teacher).expanduser()])
    check_teacher_location(teacher, pruned_dir)
    record = heal_folder(pruned_dir, teacher, out_dir, settings, overwrite=overwrite,
                         command=command_line(click.get_current_context()))
    echo_recovery(record, out_dir)


def echo_recovery(record, out_dir: Path) -> None:
    """What healing did (``record``: the healed folder's ``CompressionRecord``), as ``heal`` and ``prune --heal``
    print it."""
    recovery = record.recovery
    figures = recovery["eval"]
    click.echo(f"healed on {recovery['tokens']:,} tokens ({recovery['data']}) in {recovery['wall_seconds']:.0f} s")
    click.echo(f"held-out KL to the teacher: {recovery['kl_before']:.4f} -> {recovery['kl_after']:.4f}")
    click.echo(f"perplexity: {figures['perplexity_before']:.2f} -> {figures['perplexity_after']:.2f} "
               f"(teacher {figures['perplexity_teacher']:.2f})")
    click.echo(f"copy-recall accuracy: {figures['recall_accuracy_before']:.1%} -> "
               f"{figures['recall_accuracy_after']:.1%}")
    if record.verify is not None:
        click.echo(f"verified: reloaded logits differ by {record.verify.max_abs_logit_diff:.3g}")
    click.echo(f"wrote {out_dir}")

"""The ``compress`` command: argument parsing and progress only; the work is in ``compressor.pipeline``."""

from __future__ import annotations

import shlex
from functools import wraps
from pathlib import Path

import click

from .errors import CompressorError
from .selection import PRUNE_METHODS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def user_errors(command):
    """Turn a CompressorError into one sentence on stderr and exit status 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CompressorError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


def calibration_options(command):
    """Options shared by analyze and prune."""
    options = [
        click.option("--calib", default=None, metavar="TEXT|FILE|DIR|hf:ID",
                      help="Calibration text: a file, a folder of .txt/.md/.rst files, a .jsonl file (one document "
                           "per line), hf:DATASET[:CONFIG] (a Hub dataset, streamed; needs the datasets extra), or "
                           "literal text [default: the embedded Python-docs text]."),
        click.option("--text-field", default="text", show_default=True,
                     help="Field of a .jsonl file, or column of a Hub dataset, that holds the text."),
        click.option("--split", default="train", show_default=True, help="Split of a Hub dataset."),
        click.option("--packing", default="pack", show_default=True, type=click.Choice(["pack", "truncate"]),
                     help="pack: join documents and cut windows across them; truncate: one window per document "
                          "(its first --seq-len tokens; shorter documents are skipped)."),
        click.option("--every", default=64, show_default=True,
                     help="Tokens between measured states (a multiple of 64); fewer steps, fewer spectra."),
        click.option("--steps", default="every", show_default=True, type=click.Choice(["every", "log"]),
                     help="every: a state every --every tokens; log: at 64, 128, 256, ... tokens (and the last)."),
        click.option("--samples", default=16, show_default=True, help="Calibration sequences."),
        click.option("--seq-len", default=2048, show_default=True, help="Tokens per calibration sequence."),
        click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass."),
        click.option("--seed", default=0, show_default=True, help="Seed for choosing windows (and --method random)."),
        click.option("--eps", default=1e-4, show_default=True, help="Threshold rank: count σ_i > eps·σ_1."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                     help="Compute dtype (auto: the checkpoint's on GPU, float32 on CPU). Weights are saved in "
                          "the checkpoint's dtype."),
    ]
    for option in reversed(options):
        command = option(command)
    return _stash_source_options(command)


SOURCE_OPTIONS = ("text_field", "split", "packing", "every", "steps")
"""Calibration options that commands do not take as parameters: _settings reads them from the click context."""


def _stash_source_options(command):
    """Move the SOURCE_OPTIONS out of the command's keyword arguments into the click context's meta."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        click.get_current_context().meta["calibration"] = {name: kwargs.pop(name) for name in SOURCE_OPTIONS}
        return command(*args, **kwargs)

    return wrapper


def _settings(calib, samples, seq_len, batch_size, seed, eps):
    from .pipeline import CalibrationSettings

    extra = click.get_current_context().meta.get("calibration", {})
    return CalibrationSettings(calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, eps=eps,
                               **extra)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="compressor")
def main():
    """Prune linear-attention heads chosen from how their recurrent states behave on calibration text."""


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for stats.safetensors, report.json, report.md and figures [default: print a summary only].")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@calibration_options
@user_errors
def analyze(model, out_dir, overwrite, calib, samples, seq_len, batch_size, seed, eps, device, dtype):
    """Measure every head's state rank and norm over time on calibration text (MODEL: folder or Hub id)."""
    from .pipeline import analyze as run_analyze

    stats = run_analyze(model, _settings(calib, samples, seq_len, batch_size, seed, eps), out_dir, device, dtype,
                        overwrite=overwrite)
    ranks = stats.per_layer("threshold_rank")
    for i, layer in enumerate(stats.layers):
        shown = " ".join(f"{r:5.1f}" for r in ranks[layer].tolist())
        click.echo(f"layer {layer:3d}  mean threshold rank (bound {min(stats.state_shapes[i])}):  {shown}")
    if out_dir is not None:
        click.echo(f"wrote {out_dir / 'stats.safetensors'} and the report {out_dir / 'report.md'}")


@main.command(context_settings=CONTEXT)
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Output folder (required unless --dry-run).")
@click.option("--state-reduction", default=None, type=float,
              help="Remove heads until the recurrent state shrinks by at least this share (0 < R < 1) "
                   "[default: 0.389].")
@click.option("--method", default="joint", show_default=True, type=click.Choice(PRUNE_METHODS),
              help="Head score: joint rank-norm (the paper's Eq. 14); threshold rank, stable_rank, entropy_rank; "
                   "nuclear norm, frobenius; random; loss (each head's own loss increase when masked alone, on "
                   "--loss-samples x --loss-seq-len calibration tokens, many heads per batched forward pass); or auto (try every rule at both ends and keep "
                   "the lowest loss on held-out calibration windows; ignores --remove).")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of rank in the joint score.")
@click.option("--remove", default="high", show_default=True, type=click.Choice(["high", "low"]),
              help="Remove the highest scores (the paper's rule) or the lowest.")
@click.option("--min-heads-per-layer", default=1, show_default=True, help="Heads every layer keeps.")
@click.option("--budget", default="global", show_default=True, type=click.Choice(["global", "uniform"]),
              help="global: remove heads in score order across the model until --state-reduction is reached; "
                   "uniform: remove the same share of heads in every (unprotected) layer.")
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
@click.option("--stats", "stats_dir", type=click.Path(path_type=Path), default=None,
              help="Reuse statistics written by `compress analyze --out` instead of calibrating.")
@calibration_options
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
              help="Text file for held-out perplexity before and after.")
@click.option("--eval-samples", default=None, type=int,
              help="Evaluation sequences [default: every whole window of the file].")
@click.option("--eval-seq-len", default=1024, show_default=True, help="Tokens per evaluation sequence.")
@click.option("--dry-run", is_flag=True, help="Print the plan and sizes; write nothing.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Reload the written folder and compare logits with the in-memory pruned model.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO_ID", help="Push the folder when done.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@user_errors
def prune(model, out_dir, state_reduction, method, alpha, remove, min_heads_per_layer, budget, heads_per_layer,
          protect_layers, loss_samples, loss_seq_len, loss_batch_size, auto_holdout, stats_dir, calib,
          samples, seq_len, batch_size, seed, eps, device, dtype, eval_path, eval_samples, eval_seq_len, dry_run, verify,
          overwrite, max_shard_size, repo_id, private):
    """Remove linear-attention heads and write a smaller checkpoint (MODEL: folder or Hub id)."""
    from .pipeline import prune as run_prune

    result = run_prune(
        model, out_dir, state_reduction=state_reduction, method=method, alpha=alpha, remove=remove,
        min_heads_per_layer=min_heads_per_layer, budget=budget, heads_per_layer=heads_per_layer,
        protect_layers=protect_layers, loss_samples=loss_samples, loss_seq_len=loss_seq_len,
        loss_batch_size=loss_batch_size, calibration=_settings(calib, samples, seq_len, batch_size, seed, eps),
        stats=stats_dir, auto_holdout=auto_holdout, eval_path=eval_path, eval_samples=eval_samples,
        eval_seq_len=eval_seq_len, device=device,
        dtype=dtype, dry_run=dry_run, verify=verify, overwrite=overwrite, max_shard_size=max_shard_size,
        command=command_line(click.get_current_context()), push_to_hub=repo_id, private=private,
    )
    click.echo(summary(result.record))
    if result.out_dir is not None:
        click.echo(f"wrote {result.out_dir}")
    if "pushed" in result.record:
        click.echo(f"pushed: {result.record['pushed']}")


@main.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), default=None,
              help="Text file to measure on [default: the embedded held-out Python-docs text].")
@click.option("--samples", default=None, type=int, help="Evaluation sequences [default: every whole window].")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per evaluation sequence.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Compute dtype (auto: the checkpoint's on GPU, float32 on CPU).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the figures here.")
@user_errors
def evaluate(model, eval_path, samples, seq_len, batch_size, device, dtype, json_path):
    """Perplexity and copy-recall accuracy of MODEL (folder, prune output or Hub id)."""
    from .quality import evaluate as run_evaluate

    figures = run_evaluate(model, eval_path, samples, seq_len, batch_size, device, dtype, json_path)
    click.echo(f"perplexity: {figures['perplexity']:.2f} on {figures['windows']} x {figures['seq_len']} tokens of "
               f"{figures['data']}")
    click.echo(f"copy recall accuracy: {figures['recall_accuracy']:.1%} ({figures['recall_probe']})")
    if json_path is not None:
        click.echo(f"wrote {json_path}")


@main.command(context_settings=CONTEXT)
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to push to.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login]; never printed.")
@click.option("--endpoint", default=None, help="Hub endpoint [default: huggingface.co].")
@click.option("--force", is_flag=True, help="Push a folder that did not come from prune or failed verification.")
@user_errors
def push(folder, repo_id, private, revision, create_pr, token, endpoint, force):
    """Upload a pruned FOLDER to the Hugging Face Hub as REPO_ID."""
    from .hub import push_folder

    url = push_folder(folder, repo_id, private=private, revision=revision, create_pr=create_pr, token=token,
                      endpoint=endpoint, force=force)
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


def summary(record: dict) -> str:
    """A per-layer plan and the before/after sizes, as printed by prune."""
    lines = []
    for candidate in record["method"].get("candidates", []):
        seed = "" if candidate["seed"] is None else f" (seed {candidate['seed']})"
        lines.append(f"auto candidate {candidate['name']}{seed}, remove {candidate['remove']}: "
                     f"held-out perplexity {candidate['perplexity']:.2f}")
    if "chosen" in record["method"]:
        lines.append(f"auto chose {record['method']['chosen']}, remove {record['method']['remove']}")
    lines.append(f"{'layer':>5}  {'heads':>11}  kept value heads")
    for layer, info in record["layers"].items():
        kept = info["kept_heads"]
        lines.append(f"{layer:>5}  {info['heads_before']:>4} -> {len(kept):<4}  {kept}")
    before, after = record["state_bytes_before"], record["state_bytes_after"]
    lines.append(f"recurrent state per sequence: {before:,} -> {after:,} bytes ({1 - after / before:.1%} smaller)")
    lines.append(f"parameters: {record['params_before']:,} -> {record['params_after']:,}")
    evaluation = record.get("eval")
    if evaluation:
        lines.append(f"perplexity: {evaluation['perplexity_before']:.2f} -> {evaluation['perplexity_after']:.2f}")
        lines.append(f"copy recall accuracy: {evaluation['recall_accuracy_before']:.1%} -> "
                     f"{evaluation['recall_accuracy_after']:.1%}")
    if "verify" in record:
        lines.append(f"verified: reloaded logits differ by {record['verify']['max_abs_logit_diff']:.3g}")
    return "\n".join(lines)

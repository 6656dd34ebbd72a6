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
        click.option("--calib", default=None, metavar="TEXT|FILE|DIR",
                      help="Calibration text: a file, a folder of .txt/.md/.rst files, or literal text "
                           "[default: the embedded Python-docs text]."),
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
    return command


def _settings(calib, samples, seq_len, batch_size, seed, eps):
    from .pipeline import CalibrationSettings

    return CalibrationSettings(calib=calib, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, eps=eps)


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
@click.option("--state-reduction", default=0.389, show_default=True,
              help="Remove heads until the recurrent state shrinks by at least this share (0 < R < 1).")
@click.option("--method", default="joint", show_default=True, type=click.Choice(PRUNE_METHODS),
              help="Head score: joint rank-norm (the paper's Eq. 14); threshold rank, stable_rank, entropy_rank; "
                   "nuclear norm, frobenius; random; loss (each head's own loss increase when masked, one forward "
                   "pass over 2 x 256 calibration tokens per head); or auto (try every rule at both ends and keep "
                   "the lowest loss on held-out calibration windows; ignores --remove).")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of rank in the joint score.")
@click.option("--remove", default="high", show_default=True, type=click.Choice(["high", "low"]),
              help="Remove the highest scores (the paper's rule) or the lowest.")
@click.option("--min-heads-per-layer", default=1, show_default=True, help="Heads every layer keeps.")
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
def prune(model, out_dir, state_reduction, method, alpha, remove, min_heads_per_layer, auto_holdout, stats_dir, calib,
          samples, seq_len, batch_size, seed, eps, device, dtype, eval_path, eval_samples, eval_seq_len, dry_run, verify,
          overwrite, max_shard_size, repo_id, private):
    """Remove linear-attention heads and write a smaller checkpoint (MODEL: folder or Hub id)."""
    from .pipeline import prune as run_prune

    result = run_prune(
        model, out_dir, state_reduction=state_reduction, method=method, alpha=alpha, remove=remove,
        min_heads_per_layer=min_heads_per_layer, calibration=_settings(calib, samples, seq_len, batch_size, seed, eps),
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

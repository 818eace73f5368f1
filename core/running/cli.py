"""The ``tokenloom`` command line.

Every command prints a readable message and exits non-zero — never a
traceback — on a :class:`~tokenloom.errors.TokenloomError` (bad config,
unknown component, broken plugin in strict mode, corrupt checkpoint; exit 2),
an operating-system error (permission denied, read-only file system, disk
full, missing file: one line naming the file and the fix; exit 3), a file
that is not UTF-8 text (exit 3), an interruption (exit 130) and any other
exception (named as an internal error; exit 1). ``tokenloom --debug ...``
(or ``TOKENLOOM_DEBUG=1``) shows the traceback instead, for bug reports.
Progress bars go to stderr; results go to files and a summary to stdout.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from ..contract.errors import TokenloomError

_OS_FIXES = {
    errno.EACCES: ("permission denied", "check the permissions of {where}, or choose another --out"),
    errno.EPERM: ("operation not permitted", "check the permissions of {where}, or choose another --out"),
    errno.EROFS: ("read-only file system", "choose an --out on a writable file system"),
    errno.ENOSPC: ("no space left on the device", ("free some space (an old run's cache/ can go), or choose "
                                                   "another --out")),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or choose another --out"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory, not a file", "give a file"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: what happened, to which file, and the fix."""
    name = exc.filename if exc.filename is not None else exc.filename2
    where = Path(os.fsdecode(name)) if name is not None else None
    if where is not None and where.name.startswith(".") and where.name.endswith(".tmp"):
        # a temporary file of an atomic write: the file it was to replace (os.replace's second name),
        # else its directory
        where = Path(os.fsdecode(exc.filename2)) if exc.filename2 is not None else where.parent
    what, fix = _OS_FIXES.get(exc.errno, (exc.strerror or type(exc).__name__, "check the path and try again"))
    target = f"{where}" if where is not None else "(no file named)"
    folder = where.parent if where is not None and where.parent != Path() else where or Path(".")
    return f"{what}: {target} — {fix.format(where=folder)}"


def decode_error_message(exc: UnicodeDecodeError) -> str:
    bad = exc.object[exc.start:exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
    return (f"a file is not UTF-8 text (byte 0x{bad} at position {exc.start}): save it as UTF-8 "
            "(config files are TOML, which is UTF-8)")


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("TOKENLOOM_DEBUG", "") not in ("", "0")


class _Group(click.Group):
    """A click group that turns every failure into a one-line message (see
    the module docstring); with ``--debug`` it lets the traceback through."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except TokenloomError as exc:
            if _debug(ctx):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:
            if _debug(ctx):
                raise
            click.echo(f"error: {os_error_message(exc)}", err=True)
            ctx.exit(3)
        except UnicodeDecodeError as exc:
            if _debug(ctx):
                raise
            click.echo(f"error: {decode_error_message(exc)}", err=True)
            ctx.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted — run the same command again to continue where it stopped", err=True)
            ctx.exit(130)
        except Exception as exc:  # the last line of defence: one message, not a traceback
            if _debug(ctx):
                raise
            click.echo(f"error: internal error: {type(exc).__name__}: {exc} — run `tokenloom --debug ...` for "
                       "the traceback and report it", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenloom")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an error (for bug reports).")
def cli(debug: bool) -> None:
    """tokenloom: comparable experiments in autoregressive visual generation."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def plugins(as_json: bool) -> None:
    """List every component by kind with its distribution, version and module,
    then every plugin that failed to load."""
    from ..contract.registry import get_registry

    report = get_registry().report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for kind, entries in report["components"].items():
        click.echo(f"{kind}s ({len(entries)}):")
        for e in entries:
            click.echo(f"  {e['name']:<20} {e['distribution']} {e['version']:<10} {e['module']}")
    if report["disabled"]:
        click.echo(f"disabled by TOKENLOOM_DISABLE_PLUGINS: {', '.join(report['disabled'])}")
    if report["failures"]:
        click.echo(f"failed to load ({len(report['failures'])}):")
        for f in report["failures"]:
            click.echo(f"  {f['plugin']} ({f['dist']} {f['version']}, {f['value']}): {f['stage']}: {f['error']}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("--fit-tokenizer", "fit_only", is_flag=True,
              help="Check CONFIG as `tokenloom fit-tokenizer` reads it (no [generator] needed).")
def check(config: str, fit_only: bool) -> None:
    """Validate CONFIG without training anything: everything `run` (or, for
    a grid file, `ablate`) would refuse before doing work — every key, type
    and component name, whether the components compose, a missing
    [generator], the data set (its name, its path, held-out images) and the
    device. A grid file prints its plan: every cell's composition is
    checked and the skipped cells are listed with their reason. With
    --fit-tokenizer, as `fit-tokenizer` reads it (no [generator] needed)."""
    from ..contract.config import load_config, read_toml
    from ..contract.errors import ConfigError
    from .ablation import plan_grid
    from .grid import describe_labels
    from .pipeline_check import preflight

    raw = read_toml(config)
    if isinstance(raw, dict) and "grid" in raw:
        plan = plan_grid(raw, source=config)
        if not plan.cells:
            raise ConfigError(["grid: no cell can run"] + [f"{describe_labels(s.labels)}: {s.reason}"
                                                           for s in plan.skipped], source=config)
        click.echo(f"{config}: grid ok: {plan.describe()}")
        return
    cfg = load_config(config)
    preflight(cfg, source=config, need_generator=not fit_only)
    click.echo(f"{config}: ok")


def _summary(record: dict, out: str) -> None:
    """The run's table row and where its outputs are, on stdout."""
    from pathlib import Path

    from .results import results_markdown

    click.echo(results_markdown([record]), nl=False)
    base = Path(out)
    click.echo(f"results: {base / 'results.md'}  ({base / 'results.json'})")
    click.echo(f"samples: {base / record['artifacts']['samples']}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Run directory (default: runs/<config name>). Caches live in <out>/cache, so runs into the "
                   "same directory reuse tokenizers and models.")
@click.option("--region", type=click.Choice(["center", "border", "left", "right", "top", "bottom"]), default=None,
              help="Zero-shot inpainting/outpainting: regenerate this region of held-out images and keep the "
                   "rest (generators that support known tokens: random, masked).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run(config: str, out: str | None, region: str | None, no_progress: bool) -> None:
    """Run CONFIG end to end: data, tokenizer, backbone training, generation,
    metrics; writes results.json, results.md and samples/<run-id>.png."""
    from pathlib import Path

    from ..backbone import dist
    from .pipeline import run_file

    dist.init_from_env()  # under torchrun: one process group, rank 0 writes and prints
    out = out or str(Path("runs") / Path(config).stem)
    record = run_file(config, out, region=region, progress=not no_progress)
    if dist.is_main():
        _summary(record, out)
    dist.shutdown()


@cli.command()
@click.argument("grid", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Ablation directory (default: runs/<grid name>). Every cell shares <out>/cache; running the "
                   "same command again after a kill continues where it stopped.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--executor", "kind", type=click.Choice(["serial", "local", "slurm"]), default=None,
              help="How cells run: serial (one process, the default), or as submitit jobs on this machine "
                   "(local) or on SLURM (slurm); needs the 'cluster' extra. Overrides [executor] kind.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Jobs in flight at once.")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="Submit a failed job again this many times (default 1).")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--timeout-min", "timeout_min", type=click.IntRange(min=1), default=None,
              help="Time limit of one job in minutes (SLURM --time; default 240).")
@click.option("--gpus-per-node", "gpus_per_node", type=click.IntRange(min=0), default=None, help="GPUs per job.")
@click.option("--cpus-per-task", "cpus_per_task", type=click.IntRange(min=1), default=None, help="CPUs per job.")
@click.option("--mem-gb", "mem_gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory per job in GB.")
def ablate(grid: str, out: str | None, no_progress: bool, kind: str | None, workers: int | None,
           retries: int | None, partition: str | None, timeout_min: int | None, gpus_per_node: int | None,
           cpus_per_task: int | None, mem_gb: float | None) -> None:
    """Run every composition of GRID (a config with a [grid] table of axes,
    sweeps and exclusions): print the plan, skip incompatible cells with
    their reason, run the rest against one shared cache; writes results.json,
    results.md, plots/ (quality vs NFE and seconds per image, Pareto front),
    overview.png and a sample grid per cell. With --executor local|slurm the
    tokenizer stages and cells run as submitit jobs in the order the stage
    graph allows (docs/scale.md), with the same table as a serial run."""
    from pathlib import Path

    from ..backbone import dist
    from .ablation import run_ablation

    dist.init_from_env()  # under torchrun: one process group, rank 0 writes and prints
    out = out or str(Path("runs") / Path(grid).stem)
    flags = {"kind": kind, "workers": workers, "retries": retries, "partition": partition,
             "timeout_min": timeout_min, "gpus_per_node": gpus_per_node, "cpus_per_task": cpus_per_task,
             "mem_gb": mem_gb}
    run_ablation(grid, out, progress=not no_progress, echo=click.echo, executor=flags)
    dist.shutdown()


@cli.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=str), default="runs/demo",
              help="Run directory (default: runs/demo).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out: str, no_progress: bool) -> None:
    """A small end-to-end experiment: 16-px `shapes`, a learned tokenizer,
    the raster order with top-k sampling — a few minutes on a laptop CPU."""
    import time

    from .pipeline import demo_config, run

    t0 = time.perf_counter()
    cfg, note = demo_config()
    if note:
        click.echo(note, err=True)
    record = run(cfg, out, progress=not no_progress)
    _summary(record, out)
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")


@cli.command("fit-tokenizer")
@click.argument("config", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Output directory (default: runs/<config name>-tokenizer). A killed fit started again "
                   "with the same config resumes from <out>/train_state.safetensors.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for torch (default: torch's choice). On a small machine shared with other "
                   "processes, 1 is often several times faster for these small networks.")
def fit_tokenizer(config: str, out: str | None, no_progress: bool, threads: int | None) -> None:
    """Fit the [tokenizer] of CONFIG on its [data]; write the checkpoint, a
    reconstruction report (JSON + Markdown) and a PNG of held-out originals
    above their reconstructions."""
    from pathlib import Path

    from .tokenizer_fit import fit_tokenizer_file

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    out = out or str(Path("runs") / f"{Path(config).stem}-tokenizer")
    report = fit_tokenizer_file(config, out, progress=not no_progress)
    ho = report["holdout"]
    usage = (f"utilisation {ho['utilisation']:.3f}, perplexity {ho['perplexity']:.1f}"
             if ho.get("token_dim") is None else f"token std {ho['latent_std']:.3g}")
    kind = (f"vocabulary {ho['vocab_size']}" if ho.get("token_dim") is None
            else f"continuous tokens of width {ho['token_dim']}")
    click.echo(f"{report['tokenizer']['name']}: {ho['tokens_per_image']} tokens/image, {kind}, "
               f"held-out PSNR {ho['psnr']:.2f} dB, MSE {ho['mse']:.4g}, {usage}, "
               f"fit {report['fit_seconds']:.1f} s")
    base = Path(out)
    click.echo(f"checkpoint: {base / 'tokenizer.safetensors'}")
    click.echo(f"report: {base / 'reconstruction.md'}  ({base / 'reconstruction.json'}, {base / 'reconstruction.png'})")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--prompt", "prompts", multiple=True,
              help="A prompt to generate from (caption or text-encoder runs); repeat for several, one per column.")
@click.option("--class", "classes", multiple=True,
              help="A class name or id to generate (class-conditional runs); repeat for several. Default: all.")
@click.option("-n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Images to generate.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: the run's seed).")
@click.option("--sampler", "samplers", multiple=True,
              help="Replace the run's sampler chain: name or name:key=value,... in order, e.g. "
                   "--sampler cfg:scale=3 --sampler top-k:k=16.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="The grid PNG (default: RUN_DIR/samples/sample-<hash>.png).")
@click.option("--run", "run_id", default=None, help="Which run of RUN_DIR/results.json (default: the last).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def sample(run_dir: str, prompts: tuple[str, ...], classes: tuple[str, ...], n: int, seed: int | None,
           samplers: tuple[str, ...], out: str | None, run_id: str | None, no_progress: bool) -> None:
    """Sample from the finished run in RUN_DIR with its cached tokenizer and
    model (never retrains): tokenloom sample runs/t2i --prompt "two red squares"
    -n 16 --out grid.png."""
    from .sample import sample_run

    result = sample_run(run_dir, prompts=prompts, classes=classes, n=n, seed=seed, samplers=samplers, out=out,
                        run_id=run_id, progress=not no_progress)
    click.echo(f"{result['run']}: {n} images of {', '.join(map(repr, result['conditions']))} (seed {result['seed']}, "
               f"NFE {result['nfe']:g}, {result['seconds_per_image'] * 1e3:.1f} ms/image)")
    click.echo(f"grid: {result['path']}")


def main() -> None:
    cli(prog_name="tokenloom")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)

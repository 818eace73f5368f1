"""The ``tokenloom`` command line.

Every command prints a readable message and exits non-zero on a
:class:`~tokenloom.errors.TokenloomError` (bad config, unknown component,
broken plugin in strict mode, corrupt checkpoint) — never a traceback.
Progress bars go to stderr; results go to files and a summary to stdout.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import TokenloomError


class _Group(click.Group):
    """A click group that turns TokenloomError into a one-block message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TokenloomError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokenloom")
def cli() -> None:
    """tokenloom: comparable experiments in autoregressive visual generation."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def plugins(as_json: bool) -> None:
    """List every component by kind with its distribution, version and module,
    then every plugin that failed to load."""
    from .registry import get_registry

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
def check(config: str) -> None:
    """Validate CONFIG without running anything: every key, type and
    component name, and whether the components compose."""
    from .config import load_config
    from .pipeline_check import check_composition

    cfg = load_config(config)
    check_composition(cfg, source=config)
    click.echo(f"{config}: ok")


@cli.command()
def demo() -> None:
    """A small end-to-end experiment on the built-in `shapes` data (arrives
    with the training pipeline; until then this says so and exits 1)."""
    click.echo(
        "tokenloom demo: the end-to-end pipeline (tokenizer fit, backbone training, "
        "generation, metrics) is not built yet — see the open issues. Nothing was run.",
        err=True,
    )
    raise SystemExit(1)


def main() -> None:
    cli(prog_name="tokenloom")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)

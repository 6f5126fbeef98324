"""`nearswap-mergekit check`: would `mergekit-yaml RECIPE OUT [OPTIONS]` run here, and what does it need?"""

from __future__ import annotations

from pathlib import Path

import click

from nearswap_mergekit.cli.common import require_mergekit


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--read-rate", type=float, default=None, metavar="BYTES_PER_S",
              help="Your disk's read rate for the time estimate (default: the rate "
              "measured by benchmarks/run.py, named in the output).")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("mergekit_yaml_args", nargs=-1, type=click.UNPROCESSED,
                metavar="[OUT] [MERGEKIT-YAML OPTIONS]")
@click.pass_context
def check(ctx, read_rate, recipe, mergekit_yaml_args):
    """Before a merge: would `mergekit-yaml RECIPE OUT [OPTIONS]` run here, and what
    does it need? Takes mergekit-yaml's own arguments after RECIPE. Reads headers,
    never weights; never goes online.

    \b
    Exit 0: it would run (warnings and what cannot be known offline are listed).
    Exit 2: the problems found, every one listed.
    """
    from nearswap_mergekit.plan.recipe import Plan
    from nearswap_mergekit.tools import preflight

    require_mergekit()
    out, options = _mergekit_yaml_arguments(mergekit_yaml_args)
    report = preflight.check(Plan(recipe, options), Path(out) if out else None,
                             read_rate or preflight.MEASURED_READ_RATE)
    for finding in report.findings:
        click.echo(f"{finding.kind}: {finding.text}")
    if report.problems:
        click.echo(f"\n{len(report.problems)} problem(s): mergekit-yaml would fail or go wrong")
        ctx.exit(2)
    click.echo("\nwould run")


def _mergekit_yaml_arguments(args):
    """OUT and the MergeOptions of mergekit-yaml's arguments, parsed by mergekit's
    own click decorator."""
    from mergekit.options import MergeOptions, add_merge_options

    parsed = {}

    @click.command(add_help_option=False)
    @click.argument("out", required=False)
    @add_merge_options
    def mergekit_yaml(out, merge_options: MergeOptions):
        parsed.update(out=out, options=merge_options)

    try:
        mergekit_yaml.main(list(args), prog_name="nearswap-mergekit check", standalone_mode=False)
    except click.UsageError as error:
        raise click.UsageError(f"{error.format_message()} (as mergekit-yaml reads it)") from None
    except ValueError as error:  # mergekit's own converters (e.g. --out-shard-size's)
        raise click.UsageError(
            f"mergekit-yaml cannot read {' '.join(args)!r}: bad value {error}"
        ) from None
    return parsed["out"], parsed["options"]

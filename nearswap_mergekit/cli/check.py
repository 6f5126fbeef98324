"""`nearswap-mergekit check`: would `mergekit-yaml RECIPE OUT [OPTIONS]` run here, and what does it need?"""

from __future__ import annotations

from pathlib import Path

import click

from nearswap_mergekit.cli.common import BadInput, require_mergekit


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--read-rate", type=float, default=None, metavar="BYTES_PER_S",
              help="Your disk's read rate for the time estimate (default: a rate measured "
              "on a 2-core machine, named in the output).")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("mergekit_yaml_args", nargs=-1, type=click.UNPROCESSED,
                metavar="[OUT] [MERGEKIT-YAML OPTIONS]")
@click.pass_context
def check(ctx, read_rate, recipe, mergekit_yaml_args):
    """Before a merge: would `mergekit-yaml RECIPE OUT [OPTIONS]` run here, and what
    does it need? Takes mergekit-yaml's own arguments after RECIPE. Reads headers,
    never weights, and asks the Hub nothing: where a model is neither local nor in
    the Hugging Face cache, it tries one connection to the Hub's address (none
    with HF_HUB_OFFLINE=1) to tell whether mergekit could download it.

    For the 4 x 70B quartet, measured at its shapes: about 1.8 GiB of anonymous
    memory with --out-shard-size 1B (3.5 GiB with `tokenizer:`, about 7 GiB with
    mergekit's default 5 GB shards), a 138 GB output, about 20 minutes where the
    disk reads 0.46 GB/s; 552 GB of inputs to download.

    \b
    Exit 0: it would run (warnings and what cannot be known offline are listed).
    Exit 2: the problems found, every one listed.
    """
    from nearswap_mergekit.plan import validation
    from nearswap_mergekit.plan.recipe import Plan, RecipeError
    from nearswap_mergekit.tools import preflight

    require_mergekit()
    out, options = _mergekit_yaml_arguments(mergekit_yaml_args)
    plan = Plan(recipe, options)
    try:  # a file that is not a recipe at all: one line, as every command says it
        unreadable = validation.document_problems(plan.path, plan.documents)
    except RecipeError as error:
        unreadable = [str(error)]
    if unreadable:
        raise BadInput("\n".join(unreadable))
    report = preflight.check(plan, Path(out) if out else None, read_rate or preflight.MEASURED_READ_RATE)
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

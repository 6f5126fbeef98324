"""`nearswap-mergekit stats`: per stage, how many weights are identical, fully swapped and moved."""

from __future__ import annotations

import click

from nearswap_mergekit.cli.common import (
    check_ts,
    hide_progress_bars,
    load_plan,
    planning_options,
    reading,
    require_matplotlib,
    sample_options,
    write_json,
)


def _percent(stage: dict, key: str, sample: float) -> str:
    value, se = stage[key], stage[key + "_se"]
    if key + "_upper_95" in stage:  # none seen in the sample
        return f"{100 * value:.3f}% (< {100 * stage[key + '_upper_95']:.3f}%, 95 % bound)"
    return f"{100 * value:7.3f}%" + (f" ± {100 * se:.3f}" if sample < 1 else "")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--t", "ts", multiple=True, metavar="T", callback=check_ts,
              help="Threshold(s) to evaluate instead of the recipe's own; repeat for a ladder.")
@sample_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@planning_options
def stats(recipe, ts, sample, seed, json_path, plot_path, quiet, **flags):
    """Per stage of RECIPE's chain: how many weights are identical, fully swapped and
    moved, and by how much; per layer and per tensor in --json. Writes no model."""
    hide_progress_bars(quiet)
    from nearswap_mergekit.plan import stats as stats_module

    if plot_path:
        require_matplotlib()
    plan = load_plan(recipe, flags)
    if not plan.jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    with reading(recipe):
        report = stats_module.stats_report(plan, list(ts) or [None], sample, not quiet, seed)
    for result in report["results"]:
        label = "the recipe's own t" if result["t"] is None else f"t = {result['t']:g}"
        click.echo(f"\n{label}" + (f" (sample {sample:g}, ± one standard error)" if sample < 1 else ""))
        click.echo(f"{'stage':>5}  {'t':>9}  {'elements':>12}  {'identical':>10}  {'full swap':>10}  {'mean |shift|':>12}  model")
        for index, stage in enumerate(result["stages"], 1):
            click.echo(
                f"{index:>5}  {stage['t']:>9.3g}  {stage['elements']:>12,}  "
                f"{_percent(stage, 'identical_fraction', sample):>10}  "
                f"{_percent(stage, 'full_swap_fraction', sample):>10}  "
                f"{stage['mean_abs_shift']:>12.4g}  {stage['model']}"
            )
        for index, stage in enumerate(result["stages"], 1):
            if stage["nonfinite_fraction"]:
                click.echo(
                    f"stage {index}: {100 * stage['nonfinite_fraction']:.4g}% of elements have a NaN "
                    "or infinite v0 or v1; the formula gives them w = 1"
                )
    if len(report["results"]) > 1:
        click.echo("\n% of weights fully swapped per pass")
        stages = len(report["results"][0]["stages"])
        click.echo(f"{'t':>9}  " + "  ".join(f"{'stage ' + str(i):>9}" for i in range(1, stages + 1)) + "       mean")
        for result in report["results"]:
            values = [100 * s["full_swap_fraction"] for s in result["stages"]]
            click.echo(f"{result['t']:>9.3g}  " + "  ".join(f"{v:>8.3f}%" for v in values)
                       + f"  {sum(values) / len(values):>8.3f}%")
    write_json(json_path, report)
    if plot_path:
        from nearswap_mergekit.cli.plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}")

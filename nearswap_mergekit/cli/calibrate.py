"""`nearswap-mergekit calibrate`: the t that fully swaps a wanted share of the weights."""

from __future__ import annotations

import shlex

import click

from nearswap_mergekit.cli.common import (
    PLANNING_FLAGS,
    check_target_swap,
    hide_progress_bars,
    load_plan,
    planning_options,
    reading,
    require_matplotlib,
    rewriting,
    sample_options,
    write_json,
)


def _calibrate_command(recipe: str, target: float, sample: float, seed: int, flags: dict,
                       output: str, one_t: bool) -> str:
    """The calibrate command line that writes `output` again (for its header)."""
    words = ["nearswap-mergekit", "calibrate", recipe, "--target-swap", f"{100 * target:.12g}%"]
    if sample < 1:
        words += ["--sample", f"{sample:g}", "--seed", str(seed)]
    words += [flag for flag, (field, _) in PLANNING_FLAGS.items() if flags.get(field)]
    words += ["-o", output, *(["--global"] if one_t else [])]
    return shlex.join(words)


def _calibrated_header(recipe: str, result: dict, one_t: bool, command: str) -> str:
    """What a recipe written by calibrate -o is and how it was made."""
    target = f"{100 * result['target']:.4g}%"
    lines = [
        f"{recipe} with t calibrated to fully swap {target} of the weights per pass"
        + (", one global t." if one_t else ", one t per stage."),
        f"Made by: {command}",
    ]
    if one_t:
        per_stage = ", ".join(f"{100 * s['full_swap_fraction_at_global_t']:.3f}%" for s in result["stages"])
        lines.append(f"global t = {result['global_t']:.4g} achieves {per_stage} per stage "
                     f"(mean {100 * result['global_achieved_full_swap_fraction']:.3f}%)")
    else:
        lines += [f"stage {index}: t = {stage['t']:.4g} achieves {100 * stage['achieved_full_swap_fraction']:.3f}%"
                  f" ({stage['model']})" for index, stage in enumerate(result["stages"], 1)]
    lines += _reached_at_zero(result)
    if result["sample"] < 1:
        lines.append(f"Fractions estimated from a sample of {result['sample']:g} of each tensor's rows.")
    return "\n".join(lines)


def _reached_at_zero(result: dict) -> list:
    """Where t = 0 is suggested because the target is reached already there: the
    weights identical in base and secondary count as fully swapped at any t (the
    formula's 0 / 0 gives w = 1), so no t swaps fewer."""
    target = f"{100 * result['target']:.3f}%"
    lines = [
        f"stage {index}: {target} is reached already at t = 0, where {100 * stage['achieved_full_swap_fraction']:.3f}% "
        f"of the weights are identical in the base and {stage['model']} (they count as fully swapped at "
        "any t); no t swaps fewer, and t = 0 leaves the base's weights as they are"
        for index, stage in enumerate(result["stages"], 1)
        if stage["t"] == 0 and stage["achieved_full_swap_fraction"] >= result["target"]
    ]
    if result["global_t"] == 0 and result["global_achieved_full_swap_fraction"] >= result["target"]:
        lines.append(f"global t: {target} is reached already at t = 0 "
                     f"({100 * result['global_achieved_full_swap_fraction']:.3f}% identical per pass on average)")
    return lines


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--target-swap", required=True, metavar="FRACTION", callback=check_target_swap,
              help="Wanted share of weights fully swapped per pass: a fraction (0.008) or a "
              "percentage (0.8%).")
@sample_options
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False),
              help="Write RECIPE with each stage's suggested t under its model's parameters.")
@click.option("--global", "one_t", is_flag=True,
              help="With -o: write the one global t instead, set once in the global parameters.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of the full-swap fraction against t per stage (one more read pass).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@planning_options
def calibrate(recipe, target_swap, sample, seed, output_path, one_t, json_path, plot_path, quiet,
              **flags):
    """Suggest the t that fully swaps --target-swap of the weights per pass: per stage,
    and one global t for the whole chain; -o writes the recipe with them.

    \b
    nearswap-mergekit calibrate quartet.yml --target-swap 0.8% -o quartet-0.8.yml
    mergekit-yaml quartet-0.8.yml OUT/
    """
    hide_progress_bars(quiet)
    from nearswap_mergekit.plan import calibration, planning
    from nearswap_mergekit.tools import recipewriter

    if one_t and not output_path:
        raise click.UsageError("--global says what -o writes; give -o RECIPE.yml too")
    if plot_path:
        require_matplotlib()
    plan = load_plan(recipe, flags)
    jobs = plan.jobs
    if not jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    if output_path:  # refuse a recipe that cannot be rewritten before the long part
        stages = max(len(job.stages) for job in jobs)
        placeholder = {planning.stage_model(jobs, k): 0.0 for k in range(stages)}
        with rewriting():
            recipewriter.build_recipe(recipe, output_path, None if one_t else placeholder,
                                      0.0 if one_t else None)
    with reading(recipe):
        result = calibration.calibrate(jobs, target_swap, sample, not quiet, seed)
    click.echo(f"\ntarget: {100 * target_swap:.3f}% fully swapped per pass")
    for index, stage in enumerate(result["stages"], 1):
        click.echo(
            f"stage {index}: t = {stage['t']:.4g}  achieves {100 * stage['achieved_full_swap_fraction']:.3f}%"
            f"  ({stage['model']})"
        )
    click.echo(
        f"global t = {result['global_t']:.4g}  achieves {100 * result['global_achieved_full_swap_fraction']:.3f}%"
        " per pass on average"
    )
    for line in _reached_at_zero(result):
        click.echo(f"note: {line}")
    click.echo(result["method"])
    write_json(json_path, result)
    if output_path:
        command = _calibrate_command(recipe, target_swap, sample, seed, flags, output_path, one_t)
        per_model_t = None if one_t else {stage["model"]: stage["t"] for stage in result["stages"]}
        with rewriting():
            recipewriter.write_recipe(recipe, output_path, per_model_t, result["global_t"] if one_t else None,
                                      _calibrated_header(recipe, result, one_t, command))
        click.echo(f"wrote {output_path}; merge it with: mergekit-yaml {output_path} OUT/")
    if plot_path:
        from nearswap_mergekit.cli.plot import plot_calibration

        curves = calibration.calibration_curves(jobs, result, sample, seed, not quiet)
        plot_calibration(result, curves, plot_path)
        click.echo(f"wrote {plot_path}")

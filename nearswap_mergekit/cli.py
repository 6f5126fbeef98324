"""`nearswap-mergekit`: tools around the `nearswap_chain` mergekit method."""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import click

def stock_cli(name: str) -> str:
    """Path of a mergekit console script from this environment (e.g. mergekit-yaml)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise click.ClickException(f"{name} not found: install mergekit in this environment")
    return found


@click.group()
def main():
    """NearSwap for mergekit: run, inspect and reproduce NearSwap merges."""


@main.command()
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the recipe to this file instead of standard output.")
def recipe(name: Optional[str], output: Optional[str]):
    """List the shipped recipes, or print the one called NAME.

    \b
    nearswap-mergekit recipe quartet > quartet.yml
    mergekit-yaml quartet.yml QuartetAnemoi-70B/
    """
    from nearswap_mergekit import recipebook

    if name is None:
        catalog = recipebook.catalog()
        width = max(map(len, catalog))
        for recipe_name, summary in catalog.items():
            click.echo(f"{recipe_name:<{width}}  {summary}")
        return
    try:
        text = recipebook.text(name)
    except KeyError as error:
        raise click.BadParameter(error.args[0], param_hint="NAME") from None
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option(
    "--workdir",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the stand-in checkpoints and the merged model.",
)
@click.option(
    "--recipe",
    "recipe_name",
    default="demo-quartet",
    show_default=True,
    help="Shipped recipe to run (see `nearswap-mergekit recipe`), or a path to "
    "one; its model paths are relative to --workdir.",
)
def demo(workdir: str, recipe_name: str):
    """Build the tiny stand-in quartet and merge it with the stock mergekit-yaml."""
    from nearswap_mergekit import recipebook
    from nearswap_mergekit.tiny import build_family

    if Path(recipe_name).is_file():
        recipe_file, text = Path(recipe_name).name, Path(recipe_name).read_text()
    elif not recipe_name.startswith("demo-") or recipe_name.endswith("multistage"):
        raise click.BadParameter(
            f"{recipe_name!r} is not a one-pass demo recipe; use demo-quartet or "
            "demo-boreangale (the others need mergekit-multi or real 70B models)",
            param_hint="--recipe",
        )
    else:
        try:
            text = recipebook.text(recipe_name)
        except KeyError as error:
            raise click.BadParameter(
                f"{error.args[0]}; or give the path of a recipe file", param_hint="--recipe"
            ) from None
        recipe_file = Path(recipe_name).stem + recipebook.SUFFIX
    mergekit_yaml = stock_cli("mergekit-yaml")
    workdir_path = Path(workdir).resolve()
    started = time.perf_counter()
    paths = build_family(workdir_path / "tiny-quartet")
    click.echo(f"built {len(paths)} stand-in checkpoints in {workdir_path / 'tiny-quartet'}")
    (workdir_path / recipe_file).write_text(text)
    out = workdir_path / "merged"
    click.echo(f"running in {workdir_path}: mergekit-yaml {recipe_file} merged")
    result = subprocess.run([mergekit_yaml, recipe_file, "merged", "--quiet"], cwd=workdir_path)
    if result.returncode:
        raise click.ClickException(f"mergekit-yaml failed with exit code {result.returncode}")
    click.echo(f"merged model: {out} ({time.perf_counter() - started:.1f} s)")
    click.echo(f"swap statistics: cd {workdir} && nearswap-mergekit stats {recipe_file}")


def _sample_options(function):
    function = click.option(
        "--seed", default=0, show_default=True, type=int,
        help="Seed of the row sample (--sample < 1); the same recipe, F and seed give the same numbers.",
    )(function)
    return click.option(
        "--sample",
        default=1.0,
        show_default=True,
        type=float,
        callback=_check_sample,
        help="Fraction F of each tensor's rows to read, as runs of contiguous rows drawn "
        "at random (no fewer than a floor of runs per tensor); estimates come with "
        "standard errors. "
        "1 is exact. Speeds up safetensors checkpoints; a pickled .bin tensor is read "
        "whole whatever F.",
    )(function)


def _check_sample(_ctx, _param, value):
    if not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1]; got {value}")
    return value


def _check_ts(_ctx, _param, values):
    from nearswap_mergekit.spec import parse_threshold

    try:
        return [parse_threshold(value, "t") for value in values]
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@contextlib.contextmanager
def _reading(recipe: str):
    """Turn a failure while planning or reading into a one-line error that names the recipe."""
    from nearswap_mergekit.stats import RecipeError

    try:
        yield
    except RecipeError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # unreadable checkpoints, missing files, bad shapes
        raise click.ClickException(
            f"cannot read the models of {recipe}: {type(error).__name__}: {error}"
        ) from None


#: mergekit-yaml's options that change how a recipe is planned, as (flag, MergeOptions field).
PLANNING_FLAGS = {
    "--allow-crimes": ("allow_crimes", "Allow mixing architectures (as mergekit-yaml)."),
    "--unsafe-truncate-embeddings": (
        "unsafe_truncate_embeddings",
        "Truncate embeddings to the smallest vocabulary (as mergekit-yaml 0.1.5).",
    ),
    "--trust-remote-code": ("trust_remote_code", "Trust remote code (as mergekit-yaml)."),
    "--lazy-unpickle": (
        "lazy_unpickle",
        "As mergekit-yaml; stats always reads .bin files with mergekit's lazy unpickler.",
    ),
}


def _planning_options(function):
    for flag, (field, help_text) in reversed(PLANNING_FLAGS.items()):
        function = click.option(flag, field, is_flag=True, help=help_text)(function)
    return function


def _plan(recipe: str, flags: dict):
    from mergekit.options import MergeOptions

    from nearswap_mergekit import stats

    chosen = {field: True for field, value in flags.items() if value}
    unknown = sorted(set(chosen) - set(MergeOptions.model_fields))
    if unknown:
        flag = next(f for f, (field, _) in PLANNING_FLAGS.items() if field == unknown[0])
        raise click.UsageError(f"{flag} is not an option of the installed mergekit")
    with _reading(recipe):
        jobs = stats.plan(stats.load_recipe(recipe), MergeOptions(**chosen))
    # What mergekit and transformers imported, and the plan, live until exit: keep
    # the collector from walking those few hundred thousand objects (about 0.3 s a
    # full pass) while the tensors are read.
    gc.freeze()
    return jobs


def _percent(stage: dict, key: str, sample: float) -> str:
    value, se = stage[key], stage[key + "_se"]
    if key + "_upper_95" in stage:  # none seen in the sample
        return f"{100 * value:.3f}% (< {100 * stage[key + '_upper_95']:.3f}%, 95 % bound)"
    return f"{100 * value:7.3f}%" + (f" ± {100 * se:.3f}" if sample < 1 else "")


def _write_json(path: Optional[str], report: dict):
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {path}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--t", "ts", multiple=True, metavar="T", callback=_check_ts,
              help="Threshold(s) to evaluate instead of the recipe's own; repeat for a ladder.")
@_sample_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_planning_options
def stats(recipe, ts, sample, seed, json_path, plot_path, quiet, **flags):
    """Per stage of RECIPE's chain: how many weights are identical, fully swapped and
    moved, and by how much; per layer and per tensor in --json. Writes no model."""
    from nearswap_mergekit import stats as stats_module

    if plot_path:
        _require_matplotlib()
    jobs = _plan(recipe, flags)
    if not jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    with _reading(recipe):
        report = stats_module.stats_report(recipe, jobs, list(ts) or [None], sample, not quiet, seed)
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
    _write_json(json_path, report)
    if plot_path:
        from nearswap_mergekit.plot import plot_report

        plot_report(report, plot_path)
        click.echo(f"wrote {plot_path}")


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--plot needs matplotlib: pip install 'nearswap-mergekit[plot]'"
        ) from None


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--target-swap", required=True, type=float,
              help="Wanted fraction of weights fully swapped per pass, e.g. 0.008.")
@_sample_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_planning_options
def calibrate(recipe, target_swap, sample, seed, json_path, quiet, **flags):
    """Suggest the t that fully swaps --target-swap of the weights per pass: per stage,
    and one global t for the whole chain."""
    from nearswap_mergekit import stats as stats_module

    if not 0 < target_swap < 1:
        raise click.BadParameter(f"must be in (0, 1); got {target_swap}", param_hint="--target-swap")
    jobs = _plan(recipe, flags)
    if not jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    with _reading(recipe):
        result = stats_module.calibrate(jobs, target_swap, sample, not quiet, seed)
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
    click.echo(result["method"])
    _write_json(json_path, result)


if __name__ == "__main__":
    main()

"""`nearswap-mergekit`: tools around the `nearswap_chain` mergekit method."""

from __future__ import annotations

import contextlib
import gc
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import click

from nearswap_mergekit import __version__


class _BadInput(click.ClickException):
    """Input a command cannot use (bad recipe, missing path, no network for --pin):
    one line, exit 2, nothing written. Failures while running exit 1."""

    exit_code = 2


def stock_cli(name: str) -> str:
    """Path of a mergekit console script from this environment (e.g. mergekit-yaml)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise click.ClickException(f"{name} not found: install mergekit in this environment")
    return found


def merge_cli() -> str:
    """The one-recipe merge command of this environment: mergekit-yaml, or
    mergekitty-yaml where only mergekit's fork mergekitty is installed."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None and importlib.util.find_spec("mergekitty"):
        return "mergekitty-yaml"
    return "mergekit-yaml"


def _require_mergekit(uses: str = "plans the merge with mergekit's own planner") -> None:
    """Commands built on mergekit's planner or loader need mergekit, not mergekitty."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        fork = " (mergekitty is not enough)" if importlib.util.find_spec("mergekitty") else ""
        raise _BadInput(
            f"this command {uses}, and this environment "
            f"has no mergekit{fork}: pip install mergekit==0.1.5 (a separate environment "
            "keeps a mergekitty one as it is)"
        )


@click.group()
@click.version_option(__version__, "--version", prog_name="nearswap-mergekit")
def main():
    """NearSwap for mergekit: run, inspect and reproduce NearSwap merges."""


@main.command()
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write the recipe to this file instead of standard output.")
@click.option("--pin", is_flag=True,
              help="Write each Hugging Face Hub model as org/name@COMMIT, the commit it has now "
              "(asks the Hub: needs the network). Models already pinned are kept.")
def recipe(name: Optional[str], output: Optional[str], pin: bool):
    """List the shipped recipes, or print the one called NAME (or the recipe file NAME).

    \b
    nearswap-mergekit recipe quartet > quartet.yml
    nearswap-mergekit recipe quartet --pin -o quartet.yml
    mergekit-yaml quartet.yml QuartetAnemoi-70B/
    """
    from nearswap_mergekit import recipebook

    if name is None:
        if pin:
            raise click.UsageError("--pin needs NAME: a shipped recipe or a recipe file")
        catalog = recipebook.catalog()
        width = max(map(len, catalog))
        for recipe_name, summary in catalog.items():
            click.echo(f"{recipe_name:<{width}}  {summary}")
        return
    if Path(name).is_file():  # as `demo --recipe`: a file given by path comes first
        text = Path(name).read_text(encoding="utf-8")
    else:
        try:
            text = recipebook.text(name)
        except KeyError as error:
            raise click.BadParameter(f"{error.args[0]}; or give the path of a recipe file",
                                     param_hint="NAME") from None
    if pin:
        from datetime import datetime, timezone

        from nearswap_mergekit import pin as pinning

        def note(line: str) -> None:
            click.echo(line, err=True)

        try:
            text, commits = pinning.pin_recipe(text, datetime.now(timezone.utc), note)
        except pinning.PinError as error:  # bad input or no network
            raise _BadInput(str(error)) from None
        except pinning.HubError as error:
            raise click.ClickException(str(error)) from None
        for repo_id, commit in commits.items():
            note(f"pinned {repo_id}@{commit}")
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
    """Build the tiny stand-in quartet and merge it with the stock mergekit-yaml
    (mergekitty-yaml where only mergekitty is installed)."""
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
    merge_command = merge_cli()
    mergekit_yaml = stock_cli(merge_command)
    workdir_path = Path(workdir).resolve()
    started = time.perf_counter()
    paths = build_family(workdir_path / "tiny-quartet")
    click.echo(f"built {len(paths)} stand-in checkpoints in {workdir_path / 'tiny-quartet'}")
    (workdir_path / recipe_file).write_text(text)
    out = workdir_path / "merged"
    click.echo(f"running in {workdir_path}: {merge_command} {recipe_file} merged")
    result = subprocess.run([mergekit_yaml, recipe_file, "merged", "--quiet"], cwd=workdir_path)
    if result.returncode:
        raise click.ClickException(f"{merge_command} failed with exit code {result.returncode}")
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
    from nearswap_mergekit.planning import RecipeError

    try:
        yield
    except RecipeError as error:  # bad input: exit 2
        raise _BadInput(str(error)) from None
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
    _require_mergekit()
    from mergekit.options import MergeOptions

    from nearswap_mergekit import planning

    chosen = {field: True for field, value in flags.items() if value}
    unknown = sorted(set(chosen) - set(MergeOptions.model_fields))
    if unknown:
        flag = next(f for f, (field, _) in PLANNING_FLAGS.items() if field == unknown[0])
        raise click.UsageError(f"{flag} is not an option of the installed mergekit")
    with _reading(recipe):
        jobs = planning.plan(planning.load_recipe(recipe), MergeOptions(**chosen))
    # What mergekit and transformers imported, and the plan, live until exit: keep
    # the collector from walking those few hundred thousand objects (about 0.3 s a
    # full pass) while the tensors are read.
    gc.freeze()
    return jobs


def _hide_progress_bars(quiet: bool) -> None:
    """--quiet hides mergekit's own tqdm bars too (its vocabulary task draws one per
    aligned tensor). tqdm reads TQDM_DISABLE when it is first imported, so this runs
    before anything that imports it."""
    if quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"


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
    _hide_progress_bars(quiet)
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


def _check_target_swap(_ctx, _param, value):
    """--target-swap as a fraction (0.008) or a percentage (0.8%), one or several."""
    from nearswap_mergekit.spec import parse_target_swap

    def warn(message: str) -> None:
        click.echo(f"warning: --target-swap {message}", err=True)

    try:
        if isinstance(value, tuple):  # an option given with multiple=True
            return tuple(parse_target_swap(text, warn) for text in value)
        return parse_target_swap(value, warn)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@contextlib.contextmanager
def _rewriting():
    """A recipe that cannot be written with new t is bad input: exit 2, nothing written.
    A write that fails (a full disk, no permission) is a failure: exit 1."""
    from nearswap_mergekit.recipewriter import RecipeWriteError

    try:
        yield
    except RecipeWriteError as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write {error.filename}: {error.strerror}") from None


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
    if result["sample"] < 1:
        lines.append(f"Fractions estimated from a sample of {result['sample']:g} of each tensor's rows.")
    return "\n".join(lines)


#: calibrate --plot: points per stage, log-spaced from t / CURVE_SPAN to t * CURVE_SPAN.
CURVE_POINTS = 17
CURVE_SPAN = 100.0


def _calibration_curves(jobs, result: dict, sample: float, seed: int, progress: bool) -> list:
    """Per stage, its full-swap fraction on a log grid of t around its chosen t, with
    earlier stages at their chosen t (as calibrate searched): one more read pass."""
    from nearswap_mergekit.measuring import measure
    from nearswap_mergekit.sampling import summarize

    chosen = [stage["t"] for stage in result["stages"]]
    grids = []
    for t in chosen:
        centre = t if t > 0 else 1e-9 * CURVE_SPAN  # t = 0: the smallest t searched
        low = centre / CURVE_SPAN
        grid = [low * CURVE_SPAN ** (2 * i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)]
        grids.append(sorted({*grid, t}))
    cases = [(k, t) for k, grid in enumerate(grids) for t in grid]
    settings = [lambda job, i, k=k, t=t: t if i == k else chosen[i] for k, t in cases]
    measured = measure(jobs, settings, sample, progress, seed=seed)
    curves = [{"t": [], "full_swap_fraction": []} for _ in chosen]
    for (k, t), stages in zip(cases, measured):
        curves[k]["t"].append(t)
        fraction = summarize(list(stages[k].values()))["full_swap_fraction"]
        curves[k]["full_swap_fraction"].append(fraction)
    return curves


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--target-swap", required=True, metavar="FRACTION", callback=_check_target_swap,
              help="Wanted share of weights fully swapped per pass: a fraction (0.008) or a "
              "percentage (0.8%).")
@_sample_options
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False),
              help="Write RECIPE with each stage's suggested t under its model's parameters.")
@click.option("--global", "one_t", is_flag=True,
              help="With -o: write the one global t instead, set once in the global parameters.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the result here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG of the full-swap fraction against t per stage (one more read pass).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_planning_options
def calibrate(recipe, target_swap, sample, seed, output_path, one_t, json_path, plot_path, quiet,
              **flags):
    """Suggest the t that fully swaps --target-swap of the weights per pass: per stage,
    and one global t for the whole chain; -o writes the recipe with them.

    \b
    nearswap-mergekit calibrate quartet.yml --target-swap 0.8% -o quartet-0.8.yml
    mergekit-yaml quartet-0.8.yml OUT/
    """
    _hide_progress_bars(quiet)
    from nearswap_mergekit import calibration, planning, recipewriter

    if one_t and not output_path:
        raise click.UsageError("--global says what -o writes; give -o RECIPE.yml too")
    if plot_path:
        _require_matplotlib()
    jobs = _plan(recipe, flags)
    if not jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    if output_path:  # refuse a recipe that cannot be rewritten before the long part
        stages = max(len(job.stages) for job in jobs)
        placeholder = {planning.stage_model(jobs, k): 0.0 for k in range(stages)}
        with _rewriting():
            recipewriter.build_recipe(recipe, output_path, None if one_t else placeholder,
                                      0.0 if one_t else None)
    with _reading(recipe):
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
    click.echo(result["method"])
    _write_json(json_path, result)
    if output_path:
        command = _calibrate_command(recipe, target_swap, sample, seed, flags, output_path, one_t)
        per_model_t = None if one_t else {stage["model"]: stage["t"] for stage in result["stages"]}
        with _rewriting():
            recipewriter.write_recipe(recipe, output_path, per_model_t, result["global_t"] if one_t else None,
                                      _calibrated_header(recipe, result, one_t, command))
        click.echo(f"wrote {output_path}; merge it with: mergekit-yaml {output_path} OUT/")
    if plot_path:
        from nearswap_mergekit.plot import plot_calibration

        curves = _calibration_curves(jobs, result, sample, seed, not quiet)
        plot_calibration(result, curves, plot_path)
        click.echo(f"wrote {plot_path}")


@contextlib.contextmanager
def _checkpoint_input():
    """Bad or unreadable input of `compare`/`hash` as one line and exit 2 (like cmp)."""
    from nearswap_mergekit.compare import InputError

    try:
        yield
    except InputError as error:
        raise _BadInput(str(error)) from None
    except Exception as error:  # a truncated or corrupt shard, found while reading
        raise _BadInput(f"cannot read the checkpoint: {type(error).__name__}: {error}") from None


@main.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--sample", default=1.0, show_default=True, type=float, metavar="F",
              callback=_check_sample,
              help="Compare only a fraction F (0 < F <= 1) of each tensor's rows: the same "
              "rows on both sides, runs of contiguous rows drawn at random as `stats "
              "--sample` draws them. Fast on safetensors, but a difference outside the "
              "sample is not seen: a sample cannot prove identity (exit 0 then means that "
              "none was seen). Needs two checkpoints.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the row sample (--sample < 1); the same F and seed pick the same rows.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every tensor's result here (all differing tensors, not only the first 10).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compare_command(a, b, sample, seed, json_path, quiet):
    """Compare checkpoints A and B tensor by tensor. Exit status: 0 bit-identical,
    1 they differ, 2 bad input (as cmp and diff).

    A and B are each a model folder (safetensors, sharded or not, or
    pytorch_model.bin), a single .safetensors file, a Hub id (org/name[@revision])
    found in the local Hugging Face cache (else mergekit downloads it, unless
    HF_HUB_OFFLINE=1), or a manifest written by `nearswap-mergekit hash`.

    Per differing tensor: the fraction of elements that are bit-identical (a NaN
    equals a NaN with the same bits), the largest |difference| (float64), the
    largest distance in ULPs (-0.0 and +0.0 are 0 ULP apart though not
    identical), NaN mismatches, and the first differing index; tensors only one
    side has, and dtype or shape mismatches, are named. Against a manifest only
    bit-identity per tensor is known. One tensor per side is held at a time.

    \b
    nearswap-mergekit compare merged-cpu/ merged-cuda/
    nearswap-mergekit compare merged/ QuartetAnemoi-70B.manifest.json
    """
    _require_mergekit("reads checkpoints with mergekit's own loader")
    from nearswap_mergekit import compare as comparing

    with _checkpoint_input():
        side_a, side_b = comparing.open_side(a), comparing.open_side(b)
        result = comparing.compare(side_a, side_b, sample, seed, progress=not quiet)
    click.echo(f"A: {side_a.describe()}")
    click.echo(f"B: {side_b.describe()}")
    if json_path:
        comparing.write_json(result.to_json(), json_path)
        click.echo(f"wrote {json_path}")
    for line in comparing.iter_report(result):
        click.echo(line)
    sys.exit(0 if result.identical else 1)


@main.command("hash")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The manifest to write (JSON).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def hash_command(model, output, quiet):
    """Write a manifest of MODEL: per tensor its dtype, shape and SHA-256.

    MODEL is a model folder, a single .safetensors file or a Hub id, as for
    `compare`. Each digest covers the tensor's dtype, shape and raw little-endian
    bytes in C order, so it does not depend on how the model is sharded or
    stored. Publish the manifest beside a model: anyone can then check a merge
    of their own against it with `nearswap-mergekit compare THEIR_MODEL/
    MANIFEST.json`, without downloading the model.
    """
    from nearswap_mergekit import compare as comparing

    folder = Path(output).resolve().parent
    if not folder.is_dir():
        raise _BadInput(f"cannot write {output}: folder {folder} does not exist")
    with _checkpoint_input():
        checkpoint = comparing.open_checkpoint(model)
        manifest = comparing.hash_checkpoint(checkpoint, progress=not quiet)
    comparing.write_json(manifest, output)
    click.echo(f"wrote {output} ({len(manifest['tensors'])} tensors of {model})")


@main.command(context_settings={"ignore_unknown_options": True})
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
    from nearswap_mergekit import preflight

    _require_mergekit()
    out, options = _mergekit_yaml_arguments(mergekit_yaml_args)
    report = preflight.check(Path(recipe), Path(out) if out else None, options,
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


#: dtypes `ladder --eval-dtype` runs the model in.
EVAL_DTYPES = ("float32", "bfloat16", "float16")


def _check_ladder_method(recipe: str) -> None:
    """A recipe for another merge method is bad input for `ladder` (said before planning)."""
    import yaml

    from nearswap_mergekit.spec import METHOD_NAME

    try:
        data = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # planning says what is wrong with the file
    method = data.get("merge_method") if isinstance(data, dict) else None
    if method is not None and method != METHOD_NAME:
        raise _BadInput(
            f"recipe {recipe!r} uses merge_method {method!r}; ladder scores {METHOD_NAME!r} "
            f"recipes: set merge_method: {METHOD_NAME}"
        )


def _ladder_table(report: dict) -> list:
    """The report as one table per text."""
    lines = []
    width = max(14, *(len(rung["label"]) for rung in report["rungs"]))
    for index, text in enumerate(report["texts"]):
        lines += [
            "",
            f"{text['path']}: {text['bytes']:,} bytes, {text['tokens']:,} tokens, context {report['context']}",
            f"{'rung':<{width}}  {'t':>9}  {'full swap':>9}  {'perplexity':>10}  {'bits/byte':>9}  "
            f"{'KL from base':>12}  {'top-1 agree':>11}",
        ]
        for rung in report["rungs"]:
            scores = rung["texts"][index]
            swap = rung["full_swap"]
            swap_text = f"{100 * sum(swap) / len(swap):8.3f}%" if swap else f"{'':>9}"
            t_text = f"{rung['t']:>9.3g}" if rung["t"] is not None else f"{'':>9}"
            lines.append(
                f"{rung['label']:<{width}}  {t_text}  {swap_text}  {scores['perplexity']:>10.4f}  "
                f"{scores['bits_per_byte']:>9.5f}  {scores['kl_from_base']:>12.3e}  "
                f"{100 * scores['top1_agreement']:>10.2f}%"
            )
    lines.append("")
    lines.append(
        f"full swap: % of weights fully swapped per pass (mean over stages); "
        f"{report['batches']} forward(s) per rung; {report['bytes_read']:,} bytes read; "
        f"peak {report['peak_bytes_held']:,} bytes of merged weights held; {report['wall_seconds']:.1f} s"
    )
    return lines


def _rung_recipe_name(recipe: str, label: str) -> str:
    slug = label.replace("=", "").replace("%", "pct").replace(" ", "")
    return f"{Path(recipe).stem}-{slug}.yml"


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--text", "texts", multiple=True, required=True, metavar="FILE",
              help="A UTF-8 text file to score every rung on; repeat for several.")
@click.option("--t", "ts", multiple=True, metavar="T", callback=_check_ts,
              help="A rung with this t for every stage (as `stats --t`); repeat for a ladder.")
@click.option("--target-swap", "targets", multiple=True, metavar="FRACTION", callback=_check_target_swap,
              help="A rung at calibrate's global t for this share of weights fully swapped per "
              "pass: a fraction (0.008) or a percentage (0.8%); repeat; combines with --t. "
              "Without --t and --target-swap: the recipe's own t.")
@click.option("--context", type=int, metavar="N",
              help="Positions per window, the BOS included (default: 2048, or the model's "
              "max_position_embeddings where smaller).")
@click.option("--batch", type=click.IntRange(min=1), metavar="N",
              help="Windows per forward (default: all windows of one length at once). The base "
              "row, each rung and each --with-inputs row hold their batch's log-probabilities until "
              "it is scored: rows x N x context x vocabulary x 4 bytes.")
@click.option("--eval-dtype", type=click.Choice(EVAL_DTYPES),
              help="dtype the model runs in (default: float32 on the CPU, the recipe's dtype "
              "on CUDA); the log-softmax is float32 whatever it is.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the weights are merged and the forwards run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a PNG: bits per byte and KL from the base against the full-swap %.")
@click.option("--recipes", "recipes_dir", type=click.Path(file_okay=False),
              help="Write one recipe per --t or --target-swap rung into this folder, its t as "
              "the global t, ready for mergekit-yaml.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Also continue this prompt greedily with every rung; repeat. Slow: every "
              "generated token is a full forward that reads and merges every weight again.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1), metavar="N",
              help="Tokens generated per --prompt.")
@click.option("--with-inputs", is_flag=True,
              help="Also score each secondary alone (vocabulary-aligned, as the chain reads it): "
              "reference rows, after the rungs, in the table and --json (not in --plot).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_planning_options
def ladder(recipe, texts, ts, targets, context, batch, eval_dtype, device, json_path, plot_path,
           recipes_dir, prompts, max_new_tokens, with_inputs, quiet, **flags):
    """Score a ladder of t on your own text, and write no model: per rung, the
    perplexity and bits per byte of each --text, the KL from the base and top-1
    agreement with it, and the full-swap fraction per stage.

    Each rung's model is the one mergekit-yaml would write for RECIPE at that t,
    merged a weight at a time as transformers' forward reaches it and let go
    after; the base row (t = 0) and the rungs run together and share each read of
    the inputs. The scoring rule is written out in the docstring of
    nearswap_mergekit/scoring.py.

    \b
    nearswap-mergekit ladder quartet.yml --text notes.txt --target-swap 0.8% --target-swap 10% --t 0.0025
    """
    _hide_progress_bars(quiet)
    import torch

    from nearswap_mergekit import calibration, planning, recipewriter, scoring
    from nearswap_mergekit import ladder as laddering

    try:  # bad input first: nothing is planned, read or written before these pass
        contents = [scoring.read_text(path) for path in texts]
    except scoring.TextError as error:
        raise _BadInput(str(error)) from None
    if context is not None and context < 2:
        raise _BadInput(f"--context {context}: a window needs 2 positions or more (one to "
                        "condition on, one to score)")
    try:
        execution = laddering.execution_device(device)
    except laddering.LadderError as error:
        raise _BadInput(str(error)) from None
    if recipes_dir:
        if not (ts or targets):
            raise click.UsageError("--recipes writes one recipe per --t or --target-swap rung; give one of those")
        if Path(recipes_dir).exists() and not Path(recipes_dir).is_dir():
            raise _BadInput(f"--recipes {recipes_dir}: not a folder")
        # A recipe that cannot be rewritten: say so before the long part (checked
        # beside the recipe where the folder is still to be made).
        folder = Path(recipes_dir) if Path(recipes_dir).is_dir() else Path(recipe).parent
        with _rewriting():
            recipewriter.build_recipe(recipe, str(folder / _rung_recipe_name(recipe, "check")), None, 0.0)
    if plot_path:
        _require_matplotlib()
    _check_ladder_method(recipe)
    jobs = _plan(recipe, flags)
    if not jobs:
        raise click.ClickException(f"{recipe}: no tensor has both a base and a secondary")
    from mergekit.options import MergeOptions

    options = MergeOptions(**{field: True for field, value in flags.items() if value})
    problem = None
    with _reading(recipe):
        config = planning.load_recipe(recipe)
        try:
            output = laddering.output_model(config, options)
        except laddering.LadderError as error:  # _reading would take it for a failure
            problem = str(error)
    if problem:
        raise _BadInput(problem)
    positions = output.positions
    if context is None:
        context = min(laddering.DEFAULT_CONTEXT, positions or laddering.DEFAULT_CONTEXT)
    elif positions and context > positions:
        raise _BadInput(f"--context {context} is more than the model's {positions} positions "
                        f"(max_position_embeddings): use --context {positions} or less")
    try:
        text_set = scoring.prepare(texts, contents, output.tokenizer, context)
    except scoring.TextError as error:
        raise _BadInput(str(error)) from None
    if eval_dtype is None:
        recipe_dtype = config.dtype if config.dtype in EVAL_DTYPES else "float32"
        eval_dtype = "float32" if device == "cpu" else recipe_dtype
    rungs = [laddering.global_rung(t) for t in dict.fromkeys(ts)]
    targets = list(dict.fromkeys(targets))
    if targets:
        with _reading(recipe):
            found = calibration.global_ts_for_targets(jobs, targets, progress=not quiet)
        rungs += [laddering.global_rung(t, f"swap {100 * target:g}%") for target, (t, _) in zip(targets, found)]
    rungs.sort(key=lambda rung: rung.t)
    rungs = rungs or [laddering.recipe_rung(jobs)]
    setup = laddering.LadderRun(
        recipe=recipe, config=config, jobs=jobs, output=output, texts=text_set, context=context,
        batch=batch, device=execution, eval_dtype=getattr(torch, eval_dtype), prompts=prompts,
        max_new_tokens=max_new_tokens, progress=not quiet,
    )
    # Every secondary of any tensor's chain, in chain order (slices may give a stage
    # to different models in different layers).
    secondaries = dict.fromkeys(stage.model for job in jobs for stage in job.stages)
    references = [laddering.input_rung(model) for model in secondaries] if with_inputs else []
    try:
        report = laddering.run(setup, rungs + references)
    except laddering.LadderError as error:
        raise _BadInput(str(error)) from None
    except Exception as error:  # unreadable inputs, out of memory, a model transformers cannot run
        raise click.ClickException(f"ladder on {recipe} failed: {type(error).__name__}: {error}") from None
    for line in _ladder_table(report):
        click.echo(line)
    for rung in report["rungs"] if prompts else ():
        for item in rung["continuations"]:
            click.echo(f"{rung['label']}: {item['prompt']!r} -> {item['continuation']!r}")
    _write_json(json_path, report)
    if plot_path:
        laddering.plot_ladder(report, plot_path)
        click.echo(f"wrote {plot_path}")
    if recipes_dir:
        Path(recipes_dir).mkdir(parents=True, exist_ok=True)
        for rung, row in zip(rungs, report["rungs"][1:]):
            path = str(Path(recipes_dir) / _rung_recipe_name(recipe, rung.label))
            scores = "; ".join(f"{Path(s['path']).name}: {s['bits_per_byte']:.5f} bits/byte, KL "
                               f"{s['kl_from_base']:.3e}" for s in row["texts"])
            header = (f"{recipe} with one global t = {rung.t:.6g}: the rung {rung.label!r} of "
                      f"nearswap-mergekit ladder\n{scores}")
            with _rewriting():
                recipewriter.write_recipe(recipe, path, None, rung.t, header)
            click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What the commands share: one exit-2 error for bad input, the option groups, and
the turning of a recipe into its plan (nearswap_mergekit.plan.recipe.Plan)."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import click


class BadInput(click.ClickException):
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


def require_mergekit(uses: str = "plans the merge with mergekit's own planner") -> None:
    """Commands built on mergekit's planner or loader need mergekit, not mergekitty."""
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        fork = " (mergekitty is not enough)" if importlib.util.find_spec("mergekitty") else ""
        raise BadInput(
            f"this command {uses}, and this environment "
            f"has no mergekit{fork}: pip install mergekit==0.1.5 (a separate environment "
            "keeps a mergekitty one as it is)"
        )


def sample_options(function):
    function = click.option(
        "--seed", default=0, show_default=True, type=int,
        help="Seed of the row sample (--sample < 1); the same recipe, F and seed give the same numbers.",
    )(function)
    return click.option(
        "--sample",
        default=1.0,
        show_default=True,
        type=float,
        callback=check_sample,
        help="Fraction F of each tensor's rows to read, as runs of contiguous rows drawn "
        "at random (no fewer than a floor of runs per tensor); estimates come with "
        "standard errors. "
        "1 is exact. Speeds up safetensors checkpoints; a pickled .bin tensor is read "
        "whole whatever F.",
    )(function)


def check_sample(_ctx, _param, value):
    if not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1]; got {value}")
    return value


def check_ts(_ctx, _param, values):
    from nearswap_mergekit.method.spec import parse_threshold

    try:
        return [parse_threshold(value, "t") for value in values]
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@contextlib.contextmanager
def reading(recipe: str):
    """Turn a failure while planning or reading into a one-line error that names the recipe."""
    from nearswap_mergekit.plan.recipe import RecipeError

    try:
        yield
    except RecipeError as error:  # bad input: exit 2
        raise BadInput(str(error)) from None
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


def planning_options(function):
    for flag, (field, help_text) in reversed(PLANNING_FLAGS.items()):
        function = click.option(flag, field, is_flag=True, help=help_text)(function)
    return function


def merge_options(flags: dict):
    """mergekit's MergeOptions of the planning flags given (PLANNING_FLAGS)."""
    from mergekit.options import MergeOptions

    chosen = {field: True for field, value in flags.items() if value}
    unknown = sorted(set(chosen) - set(MergeOptions.model_fields))
    if unknown:
        flag = next(f for f, (field, _) in PLANNING_FLAGS.items() if field == unknown[0])
        raise click.UsageError(f"{flag} is not an option of the installed mergekit")
    return MergeOptions(**chosen)


def load_plan(recipe: str, flags: dict):
    """RECIPE's plan (nearswap_mergekit.plan.recipe.Plan), its jobs planned with the
    planning flags given; the one parse of the recipe for the command."""
    require_mergekit()
    from nearswap_mergekit.plan.recipe import Plan

    plan = Plan(recipe, merge_options(flags))
    with reading(recipe):
        plan.jobs
    # What mergekit and transformers imported, and the plan, live until exit: keep
    # the collector from walking those few hundred thousand objects (about 0.3 s a
    # full pass) while the tensors are read.
    gc.freeze()
    return plan


def hide_progress_bars(quiet: bool) -> None:
    """--quiet hides mergekit's own tqdm bars too (its vocabulary task draws one per
    aligned tensor). tqdm reads TQDM_DISABLE when it is first imported, so this runs
    before anything that imports it."""
    if quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"


def write_json(path: Optional[str], report: dict):
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {path}")


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException(
            "--plot needs matplotlib: pip install 'nearswap-mergekit[plot]'"
        ) from None


def check_target_swap(_ctx, _param, value):
    """--target-swap as a fraction (0.008) or a percentage (0.8%), one or several."""
    from nearswap_mergekit.method.spec import parse_target_swap

    def warn(message: str) -> None:
        click.echo(f"warning: --target-swap {message}", err=True)

    try:
        if isinstance(value, tuple):  # an option given with multiple=True
            return tuple(parse_target_swap(text, warn) for text in value)
        return parse_target_swap(value, warn)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@contextlib.contextmanager
def rewriting():
    """A recipe that cannot be written with new t is bad input: exit 2, nothing written.
    A write that fails (a full disk, no permission) is a failure: exit 1."""
    from nearswap_mergekit.tools.recipewriter import RecipeWriteError

    try:
        yield
    except RecipeWriteError as error:
        raise click.UsageError(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot write {error.filename}: {error.strerror}") from None


#: Size suffixes --memory-budget takes: decimal (k, M, G, T) and binary (Ki, Mi, Gi, Ti).
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes as written on a command line: 8000000000, 8G, 8GB, 7.5GiB, 512M."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"must be a size in bytes such as 8G, 512MiB or 8000000000; got {text!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])

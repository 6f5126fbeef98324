"""`nearswap-mergekit demo`: the tiny stand-in quartet, merged by the stock mergekit-yaml."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from nearswap_mergekit.cli.common import merge_cli, stock_cli


@click.command()
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
    from nearswap_mergekit.tiny import build_family
    from nearswap_mergekit.tools import recipebook

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
    tool = shlex.quote(this_command())
    folder = shlex.quote(str(workdir_path))
    click.echo(f"swap statistics: cd {folder} && {tool} stats {recipe_file}")
    click.echo(f"score t on a text: cd {folder} && {tool} ladder {recipe_file} --text YOUR.txt --t 0.0001 --t 0.001")


def this_command() -> str:
    """`nearswap-mergekit` as the user can type it: by name where the shell finds this
    environment's, else by its path (a virtual environment that is not activated)."""
    beside = Path(sys.executable).parent / "nearswap-mergekit"
    found = shutil.which("nearswap-mergekit")
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return "nearswap-mergekit"
    return str(beside) if beside.exists() else "nearswap-mergekit"

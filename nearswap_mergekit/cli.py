"""`nearswap-mergekit`: tools around the `nearswap_chain` mergekit method."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

#: Recipes ship in the source repository's configs/ folder.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


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
@click.option(
    "--workdir",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the stand-in checkpoints and the merged model.",
)
@click.option(
    "--recipe",
    default=str(CONFIGS_DIR / "demo-quartet.yml"),
    show_default="configs/demo-quartet.yml",
    type=click.Path(exists=True, dir_okay=False),
    help="Recipe to run; its model paths are relative to --workdir.",
)
def demo(workdir: str, recipe: str):
    """Build the tiny stand-in quartet and merge it with the stock mergekit-yaml."""
    from nearswap_mergekit.tiny import build_family

    workdir_path = Path(workdir).resolve()
    started = time.perf_counter()
    paths = build_family(workdir_path / "tiny-quartet")
    click.echo(f"built {len(paths)} stand-in checkpoints in {workdir_path / 'tiny-quartet'}")
    recipe_copy = workdir_path / Path(recipe).name
    shutil.copyfile(recipe, recipe_copy)
    out = workdir_path / "merged"
    command = [stock_cli("mergekit-yaml"), recipe_copy.name, "merged"]
    click.echo(f"running in {workdir_path}: {' '.join(command[1:])}")
    result = subprocess.run([*command, "--quiet"], cwd=workdir_path)
    if result.returncode:
        raise click.ClickException(f"mergekit-yaml failed with exit code {result.returncode}")
    click.echo(f"merged model: {out} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()

"""`nearswap-mergekit`: tools around the `nearswap_chain` mergekit method.

One module per command; each parses its flags and hands the work to the layer
below (nearswap_mergekit.plan, .ladder, .tools). Importing this package imports
neither torch nor mergekit: the commands import what they use when they run.
"""

from __future__ import annotations

import click

from nearswap_mergekit import __version__
from nearswap_mergekit.cli import calibrate, check, compare, demo, ladder, recipe, stats


@click.group()
@click.version_option(__version__, "--version", prog_name="nearswap-mergekit")
def main():
    """NearSwap for mergekit: run, inspect and reproduce NearSwap merges."""


for command in (recipe.recipe, demo.demo, stats.stats, calibrate.calibrate, compare.compare_command,
                compare.hash_command, check.check, ladder.ladder):
    main.add_command(command)

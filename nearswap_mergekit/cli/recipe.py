"""`nearswap-mergekit recipe`: list the shipped recipes, print one, pin one's Hub models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from nearswap_mergekit.cli.common import BadInput


@click.command()
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
    from nearswap_mergekit.tools import recipebook

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

        from nearswap_mergekit.tools import pin as pinning

        def note(line: str) -> None:
            click.echo(line, err=True)

        try:
            text, commits = pinning.pin_recipe(text, datetime.now(timezone.utc), note)
        except pinning.PinError as error:  # bad input or no network
            raise BadInput(str(error)) from None
        except pinning.HubError as error:
            raise click.ClickException(str(error)) from None
        for repo_id, commit in commits.items():
            note(f"pinned {repo_id}@{commit}")
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)

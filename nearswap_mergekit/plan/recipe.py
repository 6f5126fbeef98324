"""A recipe, read once per command into one `Plan`: its YAML documents, mergekit's
configuration of it, and its tensor jobs, each made on first use and kept.

`check` reads the documents (headers only, never weights); `stats`, `calibrate`
and `ladder` plan the jobs through mergekit's own planner (planning.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List

import yaml

from nearswap_mergekit.method.spec import METHOD_NAME


class RecipeError(ValueError):
    """A recipe that stats, calibrate or ladder cannot work on; the message says why
    and how to fix it."""


class Plan:
    """One recipe file and the mergekit options it is planned with."""

    def __init__(self, path: str, options=None):
        self.path = str(path)
        #: mergekit's MergeOptions (None: mergekit's defaults).
        self.options = options

    @functools.cached_property
    def text(self) -> str:
        return Path(self.path).read_text(encoding="utf-8")

    @functools.cached_property
    def documents(self) -> List[dict]:
        """Every YAML document of the file (several for mergekit-multi), empty ones left out."""
        return [doc for doc in yaml.safe_load_all(self.text) if doc is not None]

    @functools.cached_property
    def config(self):
        """mergekit's own MergeConfiguration of a one-document `nearswap_chain` recipe."""
        from mergekit.config import MergeConfiguration

        from nearswap_mergekit.method.registration import register

        register("mergekit")  # a no-op where the start-up hook has done it
        path = self.path
        if not os.path.isfile(path):
            raise RecipeError(f"recipe {path!r} does not exist")
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(self.text))
        except yaml.YAMLError as error:
            raise RecipeError(f"recipe {path!r} is not valid YAML: {error}") from None
        except Exception as error:
            raise RecipeError(f"recipe {path!r} is not a mergekit recipe: {error}") from None
        if config.merge_method != METHOD_NAME:
            raise RecipeError(
                f"recipe {path!r} uses merge_method {config.merge_method!r}; "
                f"stats and calibrate work on {METHOD_NAME!r} recipes"
            )
        return config

    @functools.cached_property
    def jobs(self) -> list:
        """Every output tensor the chain merges (planning.TensorJob), as mergekit's planner resolves it."""
        from nearswap_mergekit.plan import planning

        return planning.plan(self.config, self.options)


def load(path: str, options=None) -> Plan:
    """The plan of the recipe at `path`, its jobs planned."""
    plan = Plan(path, options)
    plan.jobs
    return plan


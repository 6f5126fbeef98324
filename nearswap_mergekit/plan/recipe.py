"""A recipe, read once per command into one `Plan`: its YAML documents, mergekit's
configuration of it, and its tensor jobs, each made on first use and kept.

`check` reads the documents (headers only, never weights); `stats`, `calibrate`
and `ladder` plan the jobs through mergekit's own planner (planning.py).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

import yaml

from nearswap_mergekit.method.spec import METHOD_NAME
from nearswap_mergekit.plan import validation


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
    def documents(self) -> List[dict]:
        """Every YAML document of the file (several for mergekit-multi), empty ones
        left out; RecipeError for a file that is missing, not UTF-8 or not YAML."""
        path = self.path
        if not os.path.isfile(path):
            raise RecipeError(f"recipe {path!r} does not exist")
        try:
            text = Path(path).read_text(encoding="utf-8")
            return [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path!r} is not UTF-8 text: save it as UTF-8") from None
        except yaml.YAMLError as error:
            raise RecipeError(validation.yaml_problem(path, error)) from None

    def problems(self, method: Optional[str] = METHOD_NAME) -> List[str]:
        """What would make the merge refuse this recipe or fail here (validation.py),
        one line each; `method`: the merge method every document must use (None: any)."""
        return validation.recipe_problems(self.path, self.documents, method=method)

    @functools.cached_property
    def config(self):
        """mergekit's own MergeConfiguration of a one-document `nearswap_chain` recipe,
        once the recipe has passed the validation."""
        from mergekit.config import MergeConfiguration

        from nearswap_mergekit.method.registration import register

        problems = self.problems()
        if problems:
            raise RecipeError("\n".join(problems))
        if len(self.documents) > 1:
            raise RecipeError(f"recipe {self.path!r} has {len(self.documents)} YAML documents (stages for "
                              "mergekit-multi); stats, calibrate and ladder take one: give them one stage's recipe")
        register("mergekit")  # a no-op where the start-up hook has done it
        try:
            return MergeConfiguration.model_validate(self.documents[0])
        except Exception as error:
            raise RecipeError(f"recipe {self.path!r} is not a recipe mergekit can read: "
                              f"{validation.pydantic_summary(error)}") from None

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


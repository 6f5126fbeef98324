"""The recipes that ship inside the package (in the repository: configs/).

Each recipe's first line is a comment saying, in one line, what it reproduces.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Dict, List

SUFFIX = ".yml"


def _folder():
    return files("nearswap_mergekit") / "recipes"


def names() -> List[str]:
    """The shipped recipes' names (file names without .yml), sorted."""
    return sorted(e.name[: -len(SUFFIX)] for e in _folder().iterdir() if e.name.endswith(SUFFIX))


def catalog() -> Dict[str, str]:
    """Recipe name -> the one line on what it reproduces."""
    return {name: text(name).splitlines()[0].lstrip("# ").strip() for name in names()}


def text(name: str) -> str:
    """The recipe called `name` (with or without .yml), as shipped.

    Raises KeyError, naming the recipes that exist, when there is no such recipe.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in names():
        raise KeyError(f"no recipe called {name!r}; the recipes are: {', '.join(names())}")
    return (_folder() / (stem + SUFFIX)).read_text(encoding="utf-8")

"""Write a copy of a `nearswap_chain` recipe with new thresholds t.

Either each stage's model gets its own plain t under its `parameters:` (any t
it had, a number, a gradient or a list of filters, is replaced), or one t is set
in the global `parameters:` and every other t is removed. Everything else in the
recipe is kept: base_model, dtype, tokenizer, merge_method, other parameters.
Recipes with `models:` and with `slices:` (t set on each slice's `sources:`)
are handled. The source's YAML comments are not carried over; the written file
starts with a comment saying what it is, how it was made and how to merge it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import yaml

from nearswap_mergekit.method.spec import check_threshold


class RecipeWriteError(ValueError):
    """The recipe cannot be written with new thresholds (bad input, one line)."""


def read_recipe(source_path: str) -> dict:
    """The recipe at source_path as YAML data, checked to be one this module can rewrite."""
    path = Path(source_path)
    if not path.is_file():
        raise RecipeWriteError(f"recipe {source_path!r} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RecipeWriteError(f"recipe {source_path!r} is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise RecipeWriteError(f"recipe {source_path!r} is not a mergekit recipe (a YAML mapping)")
    if "modules" in recipe:
        raise RecipeWriteError(
            f"recipe {source_path!r} uses `modules:`; only recipes with `models:` or "
            "`slices:` can be written with new t"
        )
    if not isinstance(recipe.get("models"), list) and not isinstance(recipe.get("slices"), list):
        raise RecipeWriteError(f"recipe {source_path!r} has neither a `models:` nor a `slices:` list")
    for number, slice_ in enumerate(recipe.get("slices") or [], 1):
        if not isinstance(slice_, dict) or not isinstance(slice_.get("sources"), list):
            raise RecipeWriteError(
                f"recipe {source_path!r}: slice {number} has no `sources:` list to set t on"
            )
    return recipe


def _inputs(recipe: dict) -> Iterator[dict]:
    """Every input entry (a `models:` item, or a source of a slice) that is a mapping."""
    for entry in recipe.get("models") or []:
        if isinstance(entry, dict):
            yield entry
    for slice_ in recipe.get("slices") or []:
        for source in slice_["sources"]:
            if isinstance(source, dict):
                yield source


def _model_name(reference) -> str:
    """A recipe's model reference as mergekit prints it (how `stats` names stages)."""
    from mergekit.common import ModelReference

    try:
        return str(ModelReference.model_validate(reference))
    except Exception:  # pydantic's validation error: several lines
        raise RecipeWriteError(f"the recipe has a model entry that is not a model: {reference!r}") from None


def _base_names(recipe: dict) -> set:
    bases = [recipe.get("base_model"), *(s.get("base_model") for s in recipe.get("slices") or [])]
    return {_model_name(base) for base in bases if base is not None}


def _drop_t(holder: dict) -> None:
    """Remove t from holder's `parameters:`, and the `parameters:` key if that empties it."""
    parameters = holder.get("parameters")
    if isinstance(parameters, dict):
        parameters.pop("t", None)
    if "parameters" in holder and not holder["parameters"]:
        del holder["parameters"]


def _set_t(holder: dict, t: float) -> None:
    """Set t as a plain number in holder's `parameters:` (in place of whatever was there)."""
    if not isinstance(holder.get("parameters"), dict):
        holder["parameters"] = {}
    holder["parameters"]["t"] = t


def with_thresholds(
    recipe: dict,
    per_model_t: Optional[Mapping[str, float]] = None,
    global_t: Optional[float] = None,
) -> dict:
    """A copy of recipe with new t: per model (keys as mergekit names the models,
    e.g. `org/model` or `./path`), or one global t. Give exactly one of the two.

    Per model: each named model's entries get their own plain t; a t set globally
    or per slice is removed once every model but the base has its own (it would
    be unused). Global: t is set once in the global `parameters:` and removed
    everywhere else (a model's or slice's own t would take precedence).
    """
    if (per_model_t is None) == (global_t is None):
        raise ValueError("give either per_model_t or global_t")
    written = copy.deepcopy(recipe)
    slices: List[dict] = written.get("slices") or []
    if global_t is not None:
        for holder in [*_inputs(written), *slices]:
            _drop_t(holder)
        _set_t(written, check_threshold(global_t, "global t"))
        return written
    ts: Dict[str, float] = {name: check_threshold(t, f"t of {name}") for name, t in per_model_t.items()}
    unmatched = set(ts)
    bases = _base_names(written)
    without_own_t = False
    for entry in _inputs(written):
        name = _model_name(entry.get("model"))
        if name in ts:
            _set_t(entry, ts[name])
            unmatched.discard(name)
        elif name not in bases and "t" not in (entry.get("parameters") or {}):
            without_own_t = True
    if unmatched:
        raise RecipeWriteError(f"the recipe has no model {sorted(unmatched)[0]!r} to set t on")
    if not without_own_t:
        for holder in [written, *slices]:
            _drop_t(holder)
    return written


class _RecipeDumper(yaml.SafeDumper):
    """Lists of numbers (layer ranges, gradients) on one line, as mergekit writes them."""

    def represent_list(self, data):
        numbers_only = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=numbers_only)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)


def render(recipe: dict, header: str, out_path: str) -> str:
    """The file's text: header and how to merge it as comments, then the recipe."""
    comment = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    comment.append(f"# Merge it: mergekit-yaml {out_path} OUT/")
    body = yaml.dump(recipe, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(comment) + "\n" + body


def build_recipe(
    source_path: str,
    out_path: str,
    per_model_t: Optional[Mapping[str, float]] = None,
    global_t: Optional[float] = None,
    header: str = "",
) -> str:
    """The text `write_recipe` would write, checked, without writing anything.

    Raises RecipeWriteError on a recipe it cannot rewrite, when the result is not
    a recipe mergekit's own parser accepts, when out_path is the source itself
    (its comments would be lost) or its folder does not exist.
    """
    if Path(out_path).resolve() == Path(source_path).resolve():
        raise RecipeWriteError(f"{out_path!r} is the source recipe; write the new recipe to another file")
    if not Path(out_path).resolve().parent.is_dir():
        raise RecipeWriteError(f"cannot write {out_path!r}: its folder does not exist; create it first")
    recipe = with_thresholds(read_recipe(source_path), per_model_t, global_t)
    from mergekit.config import MergeConfiguration

    try:
        MergeConfiguration.model_validate(recipe)
    except Exception as error:  # pydantic's or mergekit's own validation errors
        first_line = str(error).splitlines()[0]
        raise RecipeWriteError(f"the rewritten {source_path!r} is not a valid recipe: {first_line}") from None
    return render(recipe, header, out_path)


def write_recipe(
    source_path: str,
    out_path: str,
    per_model_t: Optional[Mapping[str, float]] = None,
    global_t: Optional[float] = None,
    header: str = "",
) -> str:
    """Write source_path's recipe with new t (see `with_thresholds`) to out_path,
    the header and how to merge it first, as comments. Returns the text written;
    raises RecipeWriteError (see `build_recipe`) before writing anything."""
    text = build_recipe(source_path, out_path, per_model_t, global_t, header)
    Path(out_path).write_text(text, encoding="utf-8")
    return text

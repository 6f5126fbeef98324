"""One validation of a recipe, for `check`, `stats`, `calibrate` and `ladder`: what
makes `mergekit-yaml` refuse it, or unable to run it here, said in one line per
problem that names the file, the parameter or model, and what to write instead.

t is judged by `spec.parse_threshold`, the rule the merge method itself applies to
every t mergekit hands it (after gradients are interpolated and filters applied).
Models are judged as mergekit finds them: a local folder (relative to the folder
the command runs in), else a Hub id, which must be in the local Hugging Face cache
when the Hub cannot be reached.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple
from urllib.parse import urlparse

from nearswap_mergekit.method.spec import METHOD_NAME, parse_threshold

PROBLEM, WARNING, NOT_CHECKED, INFO = "problem", "warning", "not checked", "ok"
#: What a valid t looks like, for the messages.
T_EXAMPLE = "a number >= 0 such as 0.0001"


@dataclass
class Finding:
    kind: str  # PROBLEM, WARNING, NOT_CHECKED or INFO
    text: str


def where_of(index: int, doc: dict, count: int) -> str:
    """How a message names a document: "the recipe", or "stage 2 (name)" of several."""
    if count == 1:
        return "the recipe"
    return f"stage {index}" + (f" ({doc['name']})" if doc.get("name") else "")


def document_problems(path: str, documents: List[object]) -> List[str]:
    """The file's shape: at least one document, each a mapping."""
    if not documents:
        return [f"recipe {path!r} is empty: write a mergekit recipe there (`nearswap-mergekit recipe "
                "quartet` prints one)"]
    return [f"recipe {path!r}: {where_of(i, {}, len(documents))} is a YAML {type(doc).__name__}, not a "
            "mapping: a recipe is `key: value` lines such as `merge_method: nearswap_chain`"
            for i, doc in enumerate(documents, 1) if not isinstance(doc, dict)]


def thresholds(doc: dict) -> Iterator[Tuple[Optional[str], str, object]]:
    """(model or None, where it is set, the value as written) for every t of a recipe
    document: the global `parameters:`, each model's, each slice source's; in filter
    lists and gradients, each value."""
    def values(raw, where):
        if isinstance(raw, list):  # a gradient, or a list of filter dicts
            for index, item in enumerate(raw):
                if isinstance(item, dict):
                    label = f"{where}, filter {item.get('filter')!r}" if "filter" in item else f"{where}, item {index + 1}"
                    yield from values(item.get("value"), label)
                else:
                    yield from values(item, f"{where}, gradient point {index + 1}")
        elif isinstance(raw, dict):
            yield from values(raw.get("value"), where)
        else:
            yield where, raw

    def parameters(owner) -> dict:
        found = owner.get("parameters") if isinstance(owner, dict) else None
        return found if isinstance(found, dict) else {}

    for where, raw in values(parameters(doc).get("t"), "the global `parameters:`"):
        yield None, where, raw
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and "t" in parameters(entry):
            for where, raw in values(parameters(entry)["t"], f"model {entry.get('model')}"):
                yield entry.get("model"), where, raw
    for number, piece in enumerate(doc.get("slices") or [], 1):
        for source in (piece.get("sources") or []) if isinstance(piece, dict) else []:
            if isinstance(source, dict) and "t" in parameters(source):
                where = f"slice {number}, source {source.get('model')}"
                for where_t, raw in values(parameters(source)["t"], where):
                    yield source.get("model"), where_t, raw


def threshold_problems(path: str, doc: dict, where: str) -> List[str]:
    """Every t of a `nearswap_chain` document that the merge method would refuse."""
    problems = []
    for _model, where_t, raw in thresholds(doc):
        if raw is None:
            continue  # mergekit says where a t is missing
        try:
            parse_threshold(raw)
        except ValueError:
            which = "" if where == "the recipe" else f" ({where})"
            problems.append(f"recipe {path!r}{which}: t = {raw!r} in {where_t} is not a finite number "
                            f">= 0: write {T_EXAMPLE}")
    return problems


def model_texts(doc: dict) -> List[str]:
    """Every model a recipe document names, base first."""
    texts = [str(doc["base_model"])] if doc.get("base_model") else []
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and entry.get("model"):
            texts.append(str(entry["model"]))
    for piece in doc.get("slices") or []:
        for source in (piece.get("sources") or []) if isinstance(piece, dict) else []:
            if isinstance(source, dict) and source.get("model"):
                texts.append(str(source["model"]))
    return list(dict.fromkeys(texts))


def looks_like_hub_id(text: str) -> bool:
    """mergekit asks the Hub about a path with exactly one slash that is not
    written as local (./, ../, /, ~)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~"))


def cached_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """The local Hugging Face cache's snapshot folder of a Hub model, if its
    config.json is there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def hf_cache_folder() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from here, or None where it can:
    HF_HUB_OFFLINE set, or no connection to its endpoint within a few seconds (one
    TCP connection; nothing is asked of the Hub)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or type(error).__name__})"
    return None


@dataclass
class ModelLocation:
    """Where a model of a recipe is, as mergekit will look for it."""

    text: str  # as the recipe writes it
    path: str  # its path or Hub id, without the revision
    folder: Optional[Path]  # its files on this machine, if any
    finding: Optional[Finding]  # what to say about it (None: a local folder, nothing to say)


def locate_model(text: str, workdir: Path) -> ModelLocation:
    """A model of a recipe: a local folder, a Hub model in the local cache, a Hub
    model to download, or nowhere (a problem)."""
    from mergekit.common import ModelReference

    reference = ModelReference.parse(text)
    path, revision = reference.model.path, reference.model.revision
    local = (workdir / path).expanduser()
    if local.is_dir():
        return ModelLocation(text, path, local, None)
    if not looks_like_hub_id(path):
        return ModelLocation(text, path, None, Finding(
            PROBLEM, f"model {text}: no such folder ({local}); a local path must exist, a Hub id "
                     "is written org/name"))
    snapshot = cached_snapshot(path, revision)
    if snapshot is not None:
        return ModelLocation(text, path, snapshot, Finding(INFO, f"model {text}: in the Hugging Face cache"))
    why = hub_unreachable()
    if why:
        return ModelLocation(text, path, None, Finding(
            PROBLEM, f"model {text}: a Hub model, not in the local Hugging Face cache "
                     f"({hf_cache_folder()}), and the Hub cannot be reached ({why}): download it first "
                     "where there is a network, or write a local folder"))
    return ModelLocation(text, path, None, Finding(
        NOT_CHECKED, f"model {text}: a Hub model, not in the local Hugging Face cache "
                     f"({hf_cache_folder()}): mergekit downloads it"))


def recipe_problems(path: str, documents: List[object], workdir: Optional[Path] = None,
                    method: Optional[str] = METHOD_NAME) -> List[str]:
    """Every problem of a recipe for the commands that plan it: its shape, its
    merge method (`method`, where one is required), its t, its models."""
    problems = document_problems(path, documents)
    if problems:
        return problems
    workdir = workdir or Path.cwd()
    for index, doc in enumerate(documents, 1):
        where = where_of(index, doc, len(documents))
        merge_method = doc.get("merge_method")
        if method is not None and merge_method != method:
            which = "" if len(documents) == 1 else f" ({where})"
            written = "has no merge_method" if merge_method is None else f"uses merge_method {merge_method!r}"
            problems.append(f"recipe {path!r}{which} {written}; stats, calibrate and ladder work on "
                            f"{method!r} recipes: write merge_method: {method}")
            continue
        if merge_method == METHOD_NAME:
            problems += threshold_problems(path, doc, where)
        for text in model_texts(doc):
            found = locate_model(text, workdir).finding
            if found is not None and found.kind == PROBLEM:
                problems.append(f"recipe {path!r}: {found.text}")
    return problems


def pydantic_summary(error: Exception) -> str:
    """A pydantic ValidationError in one line: each error's place and message,
    without the input dump and documentation links."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return " ".join(str(error).split())[:300]
    parts = []
    for item in errors()[:3]:
        place = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{place}: {item.get('msg')}" if place else str(item.get("msg")))
    more = len(errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def yaml_problem(path: str, error: Exception) -> str:
    """A YAML parse error in one line, with its line and column."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return (f"recipe {path!r} is not valid YAML: {problem}{at}: fix the file (a recipe is "
            "`key: value` lines; `nearswap-mergekit recipe quartet` prints one)")

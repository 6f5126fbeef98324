"""Pin a recipe's Hugging Face Hub models to the commits they have now.

A Hub repository can change under the same name. `org/name` in a recipe becomes
`org/name@<commit>`, which mergekit reads as that revision (its `ModelPath`
splits at `@`) and downloads at that commit. Local paths, the names of other
mergekit-multi stages and models already pinned are left as written.

The recipe's text is edited in place, one model string at a time, so that its
comments and layout are kept; a comment line at the top says when and against
which Hub endpoint the ids were pinned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: How long to wait for the Hub's answer about one model, in seconds.
HUB_TIMEOUT_S = 30
#: How a path that is local on its face starts (mergekit reads any path that exists
#: on disk as local; these are local even before they exist).
LOCAL_PREFIXES = ("./", "../", "/", "~")
#: Values of `tokenizer_source:` and `tokenizer: source:` that name no model.
TOKENIZER_KINDS = ("base", "union")

_STRING_TAG = "tag:yaml.org,2002:str"


class PinError(ValueError):
    """The recipe cannot be pinned as given (bad input, or no network): one line."""


class HubError(RuntimeError):
    """The Hub failed while answering (a failure while running): one line."""


@dataclass(frozen=True)
class ModelString:
    """One scalar of the recipe that mergekit reads as a model reference."""

    node: ScalarNode
    #: True where the scalar is a whole ModelReference (`model+lora` allowed);
    #: False where it is one ModelPath (the `model:`/`lora:` of a mapping form).
    with_lora: bool

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def parts(self) -> List[str]:
        """Its ModelPath strings (`path` or `path@revision`): the model, and its LoRA if any."""
        return split_reference(self.node.value) if self.with_lora else [self.node.value]


def split_path(text: str) -> Tuple[str, Optional[str]]:
    """A ModelPath string as mergekit 0.1.5 reads it: (path, revision or None)."""
    if text.count("@") > 1:
        raise PinError(f"model {text!r} has more than one '@'; mergekit cannot read it either")
    path, _, revision = text.partition("@")
    return path, revision or None


def split_reference(text: str) -> List[str]:
    """A ModelReference string's ModelPath strings: the model, and its LoRA if any."""
    parts = text.split("+")
    if len(parts) > 2:
        raise PinError(f"model {text!r} has more than one '+'; mergekit cannot read it either")
    return parts


def is_local(path: str) -> bool:
    """Whether mergekit reads `path` as a folder on disk rather than a Hub id."""
    return path.startswith(LOCAL_PREFIXES) or path in (".", "..") or os.path.exists(path)


def _get(node: Optional[Node], key: str) -> Optional[Node]:
    if not isinstance(node, MappingNode):
        return None
    for key_node, value in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key:
            return value
    return None


def _items(node: Optional[Node]) -> List[Node]:
    return list(node.value) if isinstance(node, SequenceNode) else []


def _values(node: Optional[Node]) -> List[Node]:
    return [value for _, value in node.value] if isinstance(node, MappingNode) else []


def _reference_nodes(document: Node) -> Iterator[Tuple[Node, bool]]:
    """(node, may be a tokenizer kind) for each place one recipe document holds a
    ModelReference, following mergekit's MergeConfiguration and TokenizerConfig."""

    def inputs(holder: Optional[Node]) -> Iterator[Node]:
        for entry in _items(_get(holder, "models")):
            yield _get(entry, "model")
        for slice_ in _items(_get(holder, "slices")):
            yield _get(slice_, "base_model")
            for source in _items(_get(slice_, "sources")):
                yield _get(source, "model")

    yield _get(document, "base_model"), False
    for node in inputs(document):
        yield node, False
    for module in _values(_get(document, "modules")):
        for node in inputs(module):
            yield node, False
    yield _get(document, "tokenizer_source"), True
    tokenizer = _get(document, "tokenizer")
    yield _get(tokenizer, "source"), True
    for token in _values(_get(tokenizer, "tokens")):
        source = _get(token, "source")
        # {kind: model_token, model: ...} names a model; {kind: zero} does not
        yield (_get(source, "model") if isinstance(source, MappingNode) else source), False


def _model_strings(node: Node, tokenizer_kind_allowed: bool) -> Iterator[ModelString]:
    if isinstance(node, ScalarNode):
        if node.tag != _STRING_TAG or (tokenizer_kind_allowed and node.value in TOKENIZER_KINDS):
            return
        yield ModelString(node, with_lora=True)
    elif isinstance(node, MappingNode):  # ModelReference written as {model:, lora:}
        for key in ("model", "lora"):
            path = _get(node, key)
            if isinstance(path, ScalarNode) and path.tag == _STRING_TAG:
                yield ModelString(path, with_lora=False)
            elif isinstance(path, MappingNode) and _get(path, "revision") is None:
                raise PinError(
                    f"line {path.start_mark.line + 1}: a model written as {{path: ...}} cannot be "
                    "pinned in place; write it as one string, org/name"
                )


def find_model_strings(text: str) -> Tuple[List[ModelString], set]:
    """Every model reference string of the recipe (all its `---` documents), in order,
    and the stage names (`name:`) that mergekit-multi reads as other stages' outputs."""
    try:
        documents = [d for d in yaml.compose_all(text, Loader=yaml.SafeLoader) if d is not None]
    except yaml.YAMLError as error:
        raise PinError(f"the recipe is not valid YAML: {' '.join(str(error).split())}") from None
    found: Dict[int, ModelString] = {}  # by offset: an alias repeats its anchor's node
    stage_names = set()
    for document in documents:
        if not isinstance(document, MappingNode):
            raise PinError(
                f"line {document.start_mark.line + 1}: a recipe document is a mapping of "
                "merge_method:, models: and so on"
            )
        name = _get(document, "name")
        if isinstance(name, ScalarNode):
            stage_names.add(name.value)
        for node, tokenizer_kind_allowed in _reference_nodes(document):
            for model_string in _model_strings(node, tokenizer_kind_allowed):
                found.setdefault(model_string.node.start_mark.index, model_string)
    return sorted(found.values(), key=lambda m: m.node.start_mark.index), stage_names


def hub_ids(model_strings: Sequence[ModelString], stage_names: set,
            note: Callable[[str], None] = lambda _: None) -> List[str]:
    """The Hub ids to resolve, each once, in recipe order; `note` hears of the pins kept."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    wanted: List[str] = []
    for model_string in model_strings:
        for part in model_string.parts():
            path, revision = split_path(part)
            if revision is not None:
                note(f"kept {part}: already pinned (line {model_string.line})")
            elif path in stage_names or is_local(path) or path in wanted:
                continue
            else:
                try:
                    validate_repo_id(path)
                except HFValidationError:
                    raise PinError(
                        f"line {model_string.line}: {path!r} is neither a folder here nor a Hugging "
                        "Face Hub id (org/name); write a local path as ./PATH"
                    ) from None
                wanted.append(path)
    return wanted


def _transport_errors() -> tuple:
    """Network failures (no route, refused, timed out) of the HTTP client that the
    installed huggingface_hub uses: requests before 1.0, httpx from 1.0, httpx2 later."""
    errors = []
    for module, names in (("httpx2", ["TransportError"]), ("httpx", ["TransportError"]),
                          ("requests", ["ConnectionError", "Timeout"])):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        errors += [getattr(imported, name) for name in names if hasattr(imported, name)]
    return tuple(errors)


def resolve_commits(repo_ids: Sequence[str], note: Callable[[str], None] = lambda _: None) -> Dict[str, str]:
    """Each Hub id's current commit (of its default branch), asked of the endpoint that
    huggingface_hub is set to (HF_ENDPOINT). Raises PinError, naming the model, where
    the Hub cannot be asked or has no such model; HubError where it fails to answer."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    api = HfApi()
    commits: Dict[str, str] = {}
    for repo_id in repo_ids:
        needs_network = f"cannot resolve {repo_id} to a commit: --pin needs the network to ask {api.endpoint}"
        try:
            info = api.model_info(repo_id, timeout=HUB_TIMEOUT_S)
        except OfflineModeIsEnabled:
            raise PinError(f"{needs_network}, and HF_HUB_OFFLINE is set") from None
        except _transport_errors() as error:
            raise PinError(f"{needs_network}, which cannot be reached ({type(error).__name__})") from None
        except RepositoryNotFoundError:
            raise PinError(
                f"{repo_id} is not a folder here, and {api.endpoint} has no model of that name "
                "(or it is private: log in with `hf auth login`); write a local path as ./PATH"
            ) from None
        except HfHubHTTPError as error:
            status = getattr(error.response, "status_code", "no status")
            raise HubError(f"cannot resolve {repo_id} to a commit: {api.endpoint} answered {status}") from None
        if not info.sha:
            raise HubError(f"cannot resolve {repo_id} to a commit: {api.endpoint} named no commit")
        if info.id and info.id != repo_id:
            note(f"{repo_id} is {info.id} on the Hub now; pinned to its commit")
        commits[repo_id] = info.sha
    return commits


def _pinned_value(model_string: ModelString, commits: Dict[str, str]) -> str:
    parts = model_string.parts()
    return "+".join(f"{part}@{commits[part]}" if part in commits else part for part in parts)


def _rewritten_scalar(written: str, node: ScalarNode, value: str) -> str:
    """The scalar as written, with its value replaced and its quoting kept."""
    if node.style is None and written == node.value:
        return value
    if node.style == "'" and written == "'" + node.value.replace("'", "''") + "'":
        return "'" + value.replace("'", "''") + "'"
    if node.style == '"' and written == f'"{node.value}"' and not set('"\\') & set(value):
        return f'"{value}"'
    raise PinError(
        f"line {node.start_mark.line + 1}: model {node.value!r} is not written as a one-line "
        "string; write it as org/name"
    )


def header(now: datetime, endpoint: str) -> str:
    """The comment line that says when, and against which Hub, a recipe was pinned."""
    stamp = now.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Pinned {stamp} against {endpoint}: each Hub model is at its commit of then "
            "(nearswap-mergekit recipe --pin).\n")


def pin_text(text: str, commits: Dict[str, str], now: datetime, endpoint: str) -> str:
    """The recipe's text with each id of `commits` pinned in place and the header on top."""
    model_strings, _ = find_model_strings(text)
    pieces, done = [], 0
    for model_string in model_strings:
        node = model_string.node
        value = _pinned_value(model_string, commits)
        if value == node.value:
            continue
        start, end = node.start_mark.index, node.end_mark.index
        pieces += [text[done:start], _rewritten_scalar(text[start:end], node, value)]
        done = end
    return header(now, endpoint) + "".join(pieces) + text[done:]


def pin_recipe(text: str, now: datetime,
               note: Callable[[str], None] = lambda _: None) -> Tuple[str, Dict[str, str]]:
    """Pin every Hub model of the recipe `text` to its current commit.

    Returns the pinned text and the commits used (Hub id -> commit); `note` hears
    of what is kept or renamed. Raises PinError (bad input, or no network) or
    HubError; a recipe that cannot be rewritten is refused before the Hub is asked.
    """
    from huggingface_hub import constants

    model_strings, stage_names = find_model_strings(text)
    wanted = hub_ids(model_strings, stage_names, note)
    # Check that every string can be rewritten before asking the Hub anything.
    pin_text(text, {repo_id: "0" * 40 for repo_id in wanted}, now, constants.ENDPOINT)
    commits = resolve_commits(wanted, note)
    return pin_text(text, commits, now, constants.ENDPOINT), commits

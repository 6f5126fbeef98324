"""lm-evaluation-harness tasks on every rung, by record and replay.

lm-eval asks a model once per request type, so driving it with merged-on-access
models would read the inputs once per type and per rung. Instead:

1. record: lm-eval's own `simple_evaluate` runs with a model that collects every
   request it is asked (and answers anything);
2. the ladder scores all the recorded requests on every rung in its one streamed
   pass (requests.py: lm-eval's `hf` tokenization and scoring);
3. replay: `simple_evaluate` runs once per rung with a model that answers each
   request with that rung's score, with the same tasks, seeds (lm-eval's
   defaults, the few-shot seed included), `limit` and `num_fewshot`.

Documents, few-shot examples, filters, `process_results`, aggregation, stderr and
groups are lm-eval's; a rung's `results` dict is what `simple_evaluate` returns for
it. Only lm-eval's log-likelihood request types can be answered this way:
`generate_until` would need a forward per generated token, each reading the inputs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from nearswap_mergekit.ladder.requests import LOGLIKELIHOOD, ROLLING

EXTRA = "pip install 'nearswap-mergekit[eval]'"


class TaskError(ValueError):
    """A task the ladder cannot run (bad input: one line, exit 2)."""


def require_lm_eval() -> None:
    """TaskError unless lm-eval is installed, at a version the `eval` extra allows
    (the ladder takes over a private step of its hf backend)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate  # noqa: F401
    except ImportError:
        raise TaskError(f"--task needs lm-evaluation-harness (lm-eval), which is not installed here: "
                        f"{EXTRA}") from None
    allowed = _eval_extra_versions()
    found = importlib.metadata.version("lm-eval")
    if allowed is not None and not allowed.contains(found, prereleases=True):
        raise TaskError(f"--task needs lm-eval {allowed} (the versions it is tested with); this environment "
                        f"has lm-eval {found}: {EXTRA}")


def _eval_extra_versions():
    """The lm-eval versions this package's `eval` extra pins (its metadata: one
    definition, in pyproject.toml); None where the metadata does not say."""
    from packaging.requirements import Requirement

    try:
        lines = importlib.metadata.requires("nearswap-mergekit") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in lines:
        requirement = Requirement(line)
        if requirement.name == "lm-eval" and requirement.marker and requirement.marker.evaluate({"extra": "eval"}):
            return requirement.specifier
    return None


@dataclass
class TaskRequest:
    """The task flags: names, --include-path, --limit, --num-fewshot."""

    names: Sequence[str]
    include_path: Optional[str] = None
    limit: Optional[Union[int, float]] = None
    num_fewshot: Optional[int] = None


def check_limit(limit: Optional[float]) -> Optional[Union[int, float]]:
    """--limit as lm-eval takes it: a count of documents per task (an integer, 1 or
    more) or a share of them (more than 0, less than 1)."""
    if limit is None:
        return None
    if not (limit > 0 and math.isfinite(limit)):
        raise TaskError(f"--limit {limit:g}: give 1 or more documents per task (or a share between 0 and 1)")
    if limit >= 1:
        if limit != int(limit):
            raise TaskError(f"--limit {limit:g}: a count of documents is a whole number (or give a share below 1)")
        return int(limit)
    return limit


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's warnings (defaults it fills in, few-shot overrides) and progress
    bars off the terminal;
    and, in `simple_evaluate`, none of the environment report that `results` leaves
    aside (a `git describe` that prints to the terminal outside a git checkout, and
    torch's collect_env, seconds per call): only `results` is used."""
    from unittest import mock

    import lm_eval.evaluator

    import datasets.utils.logging as datasets_logging

    # huggingface_hub's: its retries of an unreachable Hub, before a one-line error.
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # a bar per split built: noise before a one-line error
    try:
        # lm-eval's own bars (building each task's requests) and its prints
        # ("bootstrapping for stddev") go to buffers: drawn on the terminal they
        # would come before a one-line error, or above the table.
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None), \
                mock.patch.object(lm_eval.evaluator, "add_env_info", lambda _results: None), \
                contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def task_manager(request: TaskRequest):
    """lm-eval's TaskManager: the --include-path folder alone where every name asked
    for is found there (indexing lm-eval's own few thousand task files takes tens of
    seconds), else lm-eval's tasks and the folder. TaskError for a name found in
    neither, with lm-eval's suggestion where it has one."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        if request.include_path:
            local = TaskManager(include_path=request.include_path, include_defaults=False)
            if set(local.match_tasks(list(request.names))) >= set(request.names) and _loads(local, request):
                return local
        manager = TaskManager(include_path=request.include_path)
    found = set(manager.match_tasks(list(request.names)))
    for name in request.names:
        if name not in found:
            raise TaskError(_unknown(name, manager, request.include_path))
    return manager


def _loads(manager, request: TaskRequest) -> bool:
    """Whether `manager` builds every task asked for (a local group may name one of
    lm-eval's own tasks, which only the full index has)."""
    try:
        manager.load(list(request.names))
    except Exception:
        return False
    return True


def _unknown(name: str, manager, include_path: Optional[str]) -> str:
    from difflib import get_close_matches

    # The closest names; else what lm-eval suggests for a name it does not know
    # (its registries' prefix match), where this lm-eval has that helper.
    suggestions = get_close_matches(name, manager.all_tasks, n=3)
    if not suggestions:
        try:
            from lm_eval.api.registry import _suggest_similar

            suggestions = list(_suggest_similar(name, manager.all_tasks))[:3]
        except ImportError:
            pass
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (add --include-path DIR for your own)"
    return f"--task {name}: no task, group or tag of that name in {where}.{hint}"


def load_tasks(request: TaskRequest, manager) -> None:
    """Build each task, its data set included, before anything is read; TaskError
    for one whose data set is not on this machine and cannot be downloaded."""
    for name in request.names:
        try:
            with _quiet_lm_eval():
                manager.load([name])
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if isinstance(error, FileNotFoundError):
                raise TaskError(f"--task {name}: {first[:300]}: check its data_files (a relative path is "
                                "taken from the folder the command runs in)") from None
            if not _from_the_hub(error):
                raise TaskError(f"--task {name}: lm-eval could not build it ({type(error).__name__}: "
                                f"{first[:200]}): check the task's YAML") from None
            raise TaskError(
                f"--task {name}: its data set could not be loaded here ({type(error).__name__}: {first[:200]}); "
                "offline, only data sets already in the Hugging Face cache load: local files "
                "(dataset_path: json, data_files) in a task under --include-path work offline"
            ) from None


#: Where the errors of fetching a data set come from (the Hub, the network).
_FETCHING = ("datasets", "huggingface_hub", "requests", "httpx", "urllib3", "fsspec", "aiohttp")


def _from_the_hub(error: BaseException) -> bool:
    """Whether `error` is one of fetching a data set, not of the task's own making."""
    return isinstance(error, ConnectionError) or any(
        kind.__module__.split(".")[0] in _FETCHING for kind in type(error).__mro__)


def _lm_class():
    from lm_eval.api.model import LM

    class Recording(LM):
        """Collects every request lm-eval asks; answers zeros."""

        def __init__(self):
            super().__init__()
            self.records: List[Tuple[str, tuple]] = []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.records += [(LOGLIKELIHOOD, tuple(r.args)) for r in requests]
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self.records += [(ROLLING, tuple(r.args)) for r in requests]
            return [0.0] * len(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            names = sorted({getattr(r, "task_name", None) or "?" for r in requests})
            raise TaskError(
                f"--task {', '.join(names)}: a generate_until task; the ladder scores log-likelihood tasks "
                "only (generation would read the inputs once per generated token): write that t's recipe "
                "with --recipes, merge it with mergekit-yaml, then run lm_eval on the merge"
            )

    class Replaying(LM):
        """Answers each request with one rung's score for it."""

        def __init__(self, answers: Dict[Tuple[str, tuple], object]):
            super().__init__()
            self.answers = answers

        def _answer(self, kind, requests):
            try:
                return [self.answers[(kind, tuple(r.args))] for r in requests]
            except KeyError:
                raise RuntimeError("lm-eval asked for a request it did not ask for when recorded "
                                   "(a task that is not deterministic?)") from None

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._answer(LOGLIKELIHOOD, requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._answer(ROLLING, requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise RuntimeError("generate_until cannot be replayed")

    return Recording, Replaying


def _evaluate(model, request: TaskRequest, manager, **options) -> dict:
    from lm_eval import simple_evaluate

    with _quiet_lm_eval():
        return simple_evaluate(model=model, tasks=list(request.names), num_fewshot=request.num_fewshot,
                               limit=request.limit, task_manager=manager, log_samples=False, **options)


def record(request: TaskRequest, manager) -> List[Tuple[str, tuple]]:
    """Every request lm-eval makes for the tasks, in the order it asks them,
    each once."""
    recording, _ = _lm_class()
    model = recording()
    try:
        # Its metrics are of zeros and thrown away: no bootstrap for their stderr.
        _evaluate(model, request, manager, bootstrap_iters=0)
    except TaskError:
        raise
    except Exception as error:  # a template or a function of the task's failing on its documents
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TaskError(f"--task {', '.join(request.names)}: lm-eval could not build the requests "
                        f"({type(error).__name__}: {first[:200]}): check the task's YAML") from None
    return list(dict.fromkeys(model.records))


def replay(request: TaskRequest, manager, answers: Dict[Tuple[str, tuple], object]) -> dict:
    """lm-eval's `results` dict for one rung, from its answers."""
    _, replaying = _lm_class()
    return _evaluate(replaying(answers), request, manager)["results"]


def main_metrics(results: dict) -> List[Tuple[str, str, str]]:
    """(task, metric key, stderr key) of every number lm-eval reports, in its order."""
    found = []
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            found.append((task, key, f"{metric}_stderr,{filt}"))
    return found

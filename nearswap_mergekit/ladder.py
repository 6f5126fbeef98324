"""`nearswap-mergekit ladder`: score a ladder of thresholds t on your own text
without writing any merged checkpoint.

Each rung's model is transformers' own model, built on the meta device from the
merged config (mergekit's output config: the base's, with the output
vocabulary) and given accelerate's offload hooks, whose weights map merges each
weight when the forward reaches its module: its inputs as mergekit's planner
resolves them (`planning.plan`: per-model t, filters, gradients, dtype, and
`tokenizer:` alignment through mergekit's own task), then the chain kernel with
the rung's t, the job's rounding and dtype, then the recipe's `out_dtype`: the
weight `mergekit-yaml` would write. Weights no job merges (passed through) are
read from the base; tied weights are served under each of their names.

The base row (the chain at t = 0, which leaves every weight as the base has it)
and every rung run their forwards in lockstep, one thread each: the inputs of a
weight are read once per batch of windows and shared by all of them, and let go
once every rung has merged its own copy. Every forward re-merges every weight:
nothing merged outlives the module that used it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from tqdm import tqdm

from nearswap_mergekit import planning, scoring, stats
from nearswap_mergekit.kernel import nearswap_chain
from nearswap_mergekit.measuring import measure
from nearswap_mergekit.planning import Setting, TensorJob
from nearswap_mergekit.reader import TensorRows, find_rows

#: The label of the row every rung is compared with.
BASE_LABEL = "base"
#: Default longest window, where the model allows it.
DEFAULT_CONTEXT = 2048
#: Weights whose inputs may be held at once while the rungs catch up with each other.
SHARED_WINDOW = 2


class LadderError(ValueError):
    """Input the ladder cannot use (bad input: one line, exit 2)."""


@dataclass
class Rung:
    """One model of the ladder: a label, its t for the report (None for the base
    row, a reference row, or a recipe whose t varies), and each stage's t; or, for a
    reference row, the secondary it is alone."""

    label: str
    t: Optional[float]
    setting: Optional[Setting]
    alone: Optional[str] = None

    def __post_init__(self):
        if (self.setting is None) == (self.alone is None):
            raise ValueError(f"rung {self.label!r}: give a setting of t, or the secondary it is alone")


def _zero(_job: TensorJob, _index: int) -> float:
    return 0.0


def base_rung() -> Rung:
    """The chain at t = 0: every weight as the base has it (where |v0 - v1| == 0,
    w = 1 swaps in v1, which equals v0), through the same planner and kernel."""
    return Rung(BASE_LABEL, None, _zero)


def global_rung(t: float, label: Optional[str] = None) -> Rung:
    return Rung(label or f"t={t:g}", t, lambda _job, _index, t=t: t)


def input_rung(model: str) -> Rung:
    """A reference row: one secondary alone, each weight as the chain reads it
    (vocabulary-aligned, in the recipe's dtype); where that model is not in a
    weight's chain (and for weights no job merges), the base's, as in every rung."""
    return Rung(f"alone: {model}", None, None, alone=model)


def recipe_rung(jobs: Sequence[TensorJob]) -> Rung:
    """The recipe's own t; its t for the report where one t is used throughout."""
    values = {stage.t for job in jobs for stage in job.stages}
    return Rung("recipe", values.pop() if len(values) == 1 else None, planning.recipe_t)


class SwapCounts:
    """Each chain rung's counts per stage and tensor, the ones `stats` reports, taken
    from the inputs the ladder reads anyway (a separate pass would read them all
    once more): the first time a weight's inputs are read, stats' own read pass
    (`measuring.measure`) runs over them in memory at each rung's t."""

    def __init__(self, rungs: Sequence[Rung], stages: int):
        self.rungs = [rung for rung in rungs if rung.setting is not None]
        self.stages = stages
        self._sums = [[{} for _ in range(stages)] for _ in self.rungs]
        self._lock = threading.Lock()
        self._taken: Set[str] = set()

    def add(self, job: TensorJob, tensors: Sequence[torch.Tensor]) -> None:
        with self._lock:
            if job.name in self._taken or not self.rungs:
                return
            self._taken.add(job.name)
        order = [job.base_model, *(stage.model for stage in job.stages)]
        # On the CPU, as stats reads them (its gathered blocks are CPU buffers).
        readers = {model: TensorRows(tensor.cpu()) for model, tensor in zip(order, tensors)}
        in_memory = dataclasses.replace(job, readers=readers, vocabulary_task=None)
        try:
            measured = measure([in_memory], [rung.setting for rung in self.rungs], 1.0, progress=False)
        finally:
            for reader in readers.values():
                reader.release()
        with self._lock:
            for index, per_stage in enumerate(measured):
                for k, sums in enumerate(per_stage):
                    if job.name in sums:
                        self._sums[index][k][job.name] = sums[job.name]

    def missing(self, jobs: Sequence[TensorJob]) -> List[str]:
        """The jobs no forward has read (the model never asks for them), where a rung
        needs their counts."""
        return [job.name for job in jobs if job.name not in self._taken] if self.rungs else []

    def fractions(self, jobs: Sequence[TensorJob]) -> Dict[str, List[float]]:
        """Rung label -> each stage's full-swap fraction, as `stats` reports it."""
        return {
            rung.label: [stats.stage_report(jobs, self._sums[index][k], k, rung.setting)["full_swap_fraction"]
                         for k in range(self.stages)]
            for index, rung in enumerate(self.rungs)
        }


def execution_device(name: str) -> torch.device:
    """The device the merges and forwards run on: "cpu", or "cuda" (the current one)."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise LadderError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; "
                              "use --device cpu, or a CUDA build of torch on a machine with a GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


# ---------------------------------------------------------------------------
# The merged model's config and tokenizer, as mergekit-yaml writes them


@dataclass
class OutputModel:
    """What mergekit-yaml would write beside the weights: config and tokenizer."""

    config: object
    tokenizer: object

    @property
    def positions(self) -> Optional[int]:
        return getattr(self.config, "max_position_embeddings", None)


def output_model(config, options) -> OutputModel:
    """mergekit's output config (the base's, dtype set, vocabulary size set from the
    built tokenizer) and the output tokenizer: the one mergekit builds under
    `tokenizer:` / `tokenizer_source:`, else the base's, which it copies."""
    from mergekit.architecture import get_architecture_info
    from mergekit.graph import Executor
    from mergekit.merge import _get_donor_model, _update_config_vocab
    from mergekit.plan import MergePlanner

    arch_info = get_architecture_info(config, options)
    # A copy: mergekit's model references cache their configs, which it edits here.
    out_config = copy.deepcopy(planning.output_config(config, arch_info, options))
    # The planner builds its tokenizer task in its constructor: the same task the
    # merge runs, without planning anything.
    task = MergePlanner(config, arch_info, options=options, out_model_config=out_config)._tokenizer_task
    if task is not None:
        try:
            ((_, info),) = Executor([task]).run(quiet=True)
        except Exception as error:
            raise LadderError(
                f"mergekit cannot build the merged tokenizer: {type(error).__name__}: {error} "
                "(every model of a recipe with `tokenizer:` needs its tokenizer)"
            ) from None
        tokenizer = info.tokenizer
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        _update_config_vocab(out_config, arch_info, tokenizer, pad_to_multiple_of=pad)
        return OutputModel(out_config, tokenizer)
    from transformers import AutoTokenizer

    donor, path = _get_donor_model(config, options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    except Exception as error:
        raise LadderError(
            f"the base model {donor} has no tokenizer that transformers can load "
            f"({type(error).__name__}); the merge would copy the base's: add its tokenizer files to {path}"
        ) from None
    return OutputModel(out_config, tokenizer)


# ---------------------------------------------------------------------------
# Weights merged on access


@dataclass
class Inputs:
    """What one output weight is made from: the chain's inputs (base first) in the
    dtype the merge reads them in, or the base's tensor passed through."""

    job: Optional[TensorJob]
    tensors: List[torch.Tensor]
    out_dtype: Optional[torch.dtype]

    def merge(self, rung: Rung) -> torch.Tensor:
        if self.job is None:
            merged = self.tensors[0]
        elif rung.alone is not None:
            models = [stage.model for stage in self.job.stages]
            merged = self.tensors[1 + models.index(rung.alone)] if rung.alone in models else self.tensors[0]
        else:
            thresholds = [rung.setting(self.job, k) for k in range(len(self.job.stages))]
            merged = nearswap_chain(self.tensors[0], self.tensors[1:], thresholds,
                                    round_stages=self.job.round_stages)
        # mergekit's writer casts to the recipe's out_dtype last.
        return merged if self.out_dtype is None else merged.to(self.out_dtype)


def _file_bytes(reader) -> int:
    span = getattr(reader, "span", None)  # a safetensors tensor: its dtype from the header
    itemsize = span.dtype.itemsize if span is not None else reader.dtype.itemsize
    return math.prod(reader.shape) * itemsize


class InputReader:
    """Reads the inputs of each weight the merged model has, as `stats` reads a
    tensor whole (vocabulary-aligned ones through mergekit's task); counts the bytes
    asked of the input files."""

    def __init__(self, jobs: Sequence[TensorJob], config, names: Dict[str, str], device: torch.device,
                 counts: Optional[SwapCounts] = None):
        self.jobs = {job.name: job for job in jobs}
        self.counts = counts
        self.device = device
        self.dtype = getattr(torch, config.dtype) if config.dtype else None
        self.out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else None
        self.passthrough = {}
        for source in set(names.values()) - set(self.jobs):
            reader = find_rows(config.base_model, [source])
            if reader is None:
                raise LadderError(
                    f"the merged model needs {source}, which the recipe's plan does not merge "
                    f"and the base {config.base_model} does not have"
                )
            self.passthrough[source] = reader
        self._lock = threading.Lock()
        self.bytes_read = 0

    def __call__(self, name: str) -> Inputs:
        job = self.jobs.get(name)
        if job is None:  # passed through from the base, read as mergekit loads it
            reader = self.passthrough[name]
            tensors = [self._tensor(reader, self.dtype)]
            reader.release()
            self._count(_file_bytes(reader))
            return Inputs(None, tensors, self.out_dtype)
        readers = job.open()
        try:
            order = [job.base_model, *(stage.model for stage in job.stages)]
            tensors = [self._tensor(readers[model], job.dtype) for model in order]
        finally:
            for reader in readers.values():
                reader.release()
        self._count(sum(_file_bytes(reader) for reader in job.readers.values()))
        if self.counts is not None:
            self.counts.add(job, tensors)
        return Inputs(job, tensors, self.out_dtype)

    def _tensor(self, reader, dtype: Optional[torch.dtype]) -> torch.Tensor:
        tensor = reader.matrix().reshape(reader.shape)
        # mergekit's loader casts each input to the recipe's dtype.
        return tensor.to(device=self.device, dtype=dtype or tensor.dtype)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes


class Aborted(RuntimeError):
    """Another rung's forward failed: this one stops too."""


class SharedInputs:
    """Inputs read once and handed to each of `parties` rungs, which ask for the same
    weights in the same order (each access is keyed by name and occurrence).

    At most SHARED_WINDOW weights' inputs are held at once: a rung ahead of the
    others waits for them before reading the next."""

    def __init__(self, read: Callable[[str], Inputs], parties: int):
        self._read, self._parties = read, parties
        self._condition = threading.Condition()
        self._entries: Dict[Tuple[str, int], dict] = {}
        self._failure: Optional[BaseException] = None

    def fail(self, error: BaseException) -> None:
        with self._condition:
            self._failure = self._failure or error
            self._condition.notify_all()

    def _check(self) -> None:
        if self._failure is not None:
            raise Aborted("stopped: another rung failed")

    def get(self, key: Tuple[str, int]) -> Inputs:
        with self._condition:
            while True:
                self._check()
                entry = self._entries.get(key)
                if entry is not None:
                    reader = False
                    break
                if len(self._entries) < SHARED_WINDOW:
                    entry = self._entries[key] = {"value": None, "taken": 0}
                    reader = True
                    break
                self._condition.wait()
        if reader:
            try:
                value = self._read(key[0])
            except BaseException as error:
                self.fail(error)
                raise
            with self._condition:
                entry["value"] = value
                self._condition.notify_all()
        with self._condition:
            while entry["value"] is None:
                self._check()
                self._condition.wait()
            entry["taken"] += 1
            if entry["taken"] == self._parties:
                del self._entries[key]
                self._condition.notify_all()
            return entry["value"]


class MergedHoldings:
    """Bytes of merged weights alive at once (each counted until its storage is
    freed, when accelerate's hook moves the module back to the meta device)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        with self._lock:
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._drop, nbytes)

    def _drop(self, nbytes: int) -> None:
        with self._lock:
            self.now -= nbytes


class MergedWeights(Mapping):
    """accelerate's weights map for one rung's model: each weight merged when asked
    for, in the model's dtype, on its device."""

    def __init__(self, names: Dict[str, str], rung: Rung, dtype: torch.dtype,
                 device: torch.device, held: MergedHoldings, merged: Callable[[], None]):
        self._names = names
        self._rung, self._dtype, self._device = rung, dtype, device
        self._held, self._merged = held, merged
        self._seen: Counter = Counter()
        self.source: Optional[SharedInputs] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        source = self._names[name]  # KeyError for a name the model does not have
        occurrence = self._seen[name]
        self._seen[name] += 1
        inputs = self.source.get((source, occurrence))
        tensor = inputs.merge(self._rung).to(device=self._device, dtype=self._dtype)
        self._held.track(tensor)
        self._merged()
        return tensor

    def __contains__(self, name) -> bool:  # without merging (Mapping's would merge)
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def empty_model(out_config, dtype: torch.dtype):
    """transformers' own model for the merged config, its weights on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(out_config, dtype=dtype)
    # As loading a checkpoint does: tied weights (tie_word_embeddings) become one
    # parameter, which the checkpoint may hold under one name only.
    model.tie_weights()
    return model.eval()


def weight_sources(model, planned: Sequence[str]) -> Dict[str, str]:
    """Each tensor name the model asks its weights map for -> the planned weight
    that gives it: itself, or, for a weight tied to a planned one, that one (the
    output's tensor set is the plan's; what no job merges is read from the base)."""
    planned = set(planned)
    groups: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    sources = {}
    for names in groups.values():
        merged = [name for name in names if name in planned]
        for name in names:
            sources[name] = name if name in planned or not merged else merged[0]
    return sources


# ---------------------------------------------------------------------------
# The ladder


@dataclass
class LadderRun:
    """Everything a ladder run needs besides the rungs."""

    recipe: str
    config: object  # mergekit's MergeConfiguration
    jobs: List[TensorJob]
    output: OutputModel
    texts: scoring.TextSet
    context: int
    batch: Optional[int]
    device: torch.device
    eval_dtype: torch.dtype
    prompts: Sequence[str] = ()
    max_new_tokens: int = 32
    progress: bool = True


def run(setup: LadderRun, rungs: Sequence[Rung]) -> dict:
    """Score the base row and every rung on every text; the `ladder` JSON report."""
    from accelerate.hooks import attach_align_device_hook

    started = time.perf_counter()
    parties = [base_rung(), *rungs]
    models = [empty_model(setup.output.config, setup.eval_dtype) for _ in parties]
    names = weight_sources(models[0], [job.name for job in setup.jobs])
    counts = SwapCounts(rungs, max(len(job.stages) for job in setup.jobs))
    reader = InputReader(setup.jobs, setup.config, names, setup.device, counts)
    groups = scoring.batches(setup.texts.windows, setup.batch)
    held = MergedHoldings()
    bar = tqdm(total=len(groups) * len(parties) * len(names), unit="tensors", desc="merging",
               disable=not setup.progress)
    bar_lock = threading.Lock()

    def merged() -> None:
        with bar_lock:
            bar.update(1)

    maps = []
    for party, model in zip(parties, models):
        weights = MergedWeights(names, party, setup.eval_dtype, setup.device, held, merged)
        attach_align_device_hook(model, execution_device=setup.device, offload=True, weights_map=weights)
        maps.append(weights)
    scores = [[scoring.Score() for _ in setup.texts.paths] for _ in parties]
    with ThreadPoolExecutor(max_workers=len(parties), thread_name_prefix="nearswap-rung") as pool:
        for group in groups:
            ids = scoring.input_ids(group, setup.device)
            source = SharedInputs(reader, len(parties))
            for weights in maps:
                weights.source = source

            def forward(model, source=source, ids=ids):
                try:
                    with torch.inference_mode():
                        return scoring.log_probs(model(input_ids=ids, use_cache=False).logits)
                except BaseException as error:
                    source.fail(error)
                    raise

            futures = [pool.submit(forward, model) for model in models]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except BaseException as error:
                    outcomes.append(error)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                raise next((f for f in failures if not isinstance(f, Aborted)), failures[0])
            base_logp = outcomes[0]
            scoring.add_batch(scores[0], group, base_logp)
            for index in range(1, len(parties)):
                scoring.add_batch(scores[index], group, outcomes[index], base_logp)
                outcomes[index] = None  # let go of this rung's log-probabilities
    bar.close()
    bytes_scoring = reader.bytes_read
    for name in counts.missing(setup.jobs):  # planned, but no forward asked for it
        reader(name)
    full_swap = counts.fractions(setup.jobs)
    bytes_counting = reader.bytes_read - bytes_scoring
    continuations = _continue_prompts(setup, parties, models, maps, reader) if setup.prompts else None
    report_rungs = []
    for index, (party, per_text) in enumerate(zip(parties, scores)):
        row = {
            "label": party.label,
            "t": party.t,
            "full_swap": full_swap.get(party.label),
            "texts": [score.report(path, size) for score, path, size
                      in zip(per_text, setup.texts.paths, setup.texts.sizes)],
        }
        if continuations is not None:
            row["continuations"] = continuations[index]
        report_rungs.append(row)
    return {
        "recipe": setup.recipe,
        "context": setup.context,
        "batches": len(groups),
        "device": str(setup.device),
        "eval_dtype": str(setup.eval_dtype).removeprefix("torch."),
        "texts": setup.texts.describe(),
        "rungs": report_rungs,
        "peak_bytes_held": held.peak,
        # Bytes asked of the input files while scoring, and then for the prompts.
        "bytes_read": bytes_scoring,
        # For the full-swap column, of weights no forward asked for (usually none).
        "bytes_read_counting": bytes_counting,
        "bytes_read_prompts": reader.bytes_read - bytes_scoring - bytes_counting,
        "wall_seconds": time.perf_counter() - started,
    }


def _continue_prompts(setup: LadderRun, parties, models, maps, reader) -> List[List[dict]]:
    """Greedy continuations of each prompt, rung by rung (each generated token is a
    forward that merges every weight again)."""
    tokenizer = setup.output.tokenizer
    bos = scoring.bos_of(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for model, weights in zip(models, maps):
        rows = []
        for prompt in setup.prompts:
            prompt_ids = ([bos] if bos is not None else []) + scoring.tokenize(tokenizer, prompt)
            ids = torch.tensor([prompt_ids], device=setup.device)
            weights.source = SharedInputs(reader, 1)
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=setup.max_new_tokens, pad_token_id=pad)
            text = tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)
            rows.append({"prompt": prompt, "continuation": text})
        results.append(rows)
    return results


def plot_ladder(report: dict, path: str) -> None:
    """PNG: bits per byte per text, and KL from the base, against the % of weights
    fully swapped per pass (mean over stages); the base as a dotted line."""
    from pathlib import Path

    import matplotlib.ticker

    from nearswap_mergekit.plot import _pyplot, _save

    plt = _pyplot()
    base, *rungs = report["rungs"]
    rungs = sorted((r for r in rungs if r["full_swap"]), key=lambda r: sum(r["full_swap"]))
    swapped = [100 * sum(r["full_swap"]) / len(r["full_swap"]) for r in rungs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, text in enumerate(report["texts"]):
        name = Path(text["path"]).name
        bits = [r["texts"][index]["bits_per_byte"] for r in rungs]
        (line,) = left.plot(swapped, bits, marker="o", label=name)
        left.axhline(base["texts"][index]["bits_per_byte"], color=line.get_color(), linestyle=":",
                     linewidth=1.2, label=f"{name}: base")
        kl = [r["texts"][index]["kl_from_base"] for r in rungs]
        right.plot(swapped, kl, marker="o", color=line.get_color(), label=name)
        if index == 0:  # name each rung once, beside the first text's points
            for rung, x, y_bits, y_kl in zip(rungs, swapped, bits, kl):
                for axis, y in ((left, y_bits), (right, y_kl)):
                    axis.annotate(rung["label"], (x, y), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7, color="grey")
    right.axhline(0.0, color="grey", linestyle=":", linewidth=1.2, label="base")
    for axis in (left, right):
        if swapped and min(swapped) > 0:
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("% fully swapped per pass (mean over stages)")
        axis.legend(fontsize=8)
    left.set(ylabel="bits per byte", title="Bits per byte against full swap")
    right.set(ylabel="KL(base || rung) per token, nats", title="KL from the base")
    _save(figure, path)

"""Weights merged on access: each rung's weights map, which reads a weight's
inputs once for all rows (shared, then let go) and merges its own copy when the
forward reaches the module that uses it."""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from nearswap_mergekit.ladder.rungs import LadderError, Rung, SwapCounts
from nearswap_mergekit.method.kernel import nearswap_chain
from nearswap_mergekit.plan.planning import TensorJob
from nearswap_mergekit.plan.reader import find_rows

#: Weights whose inputs may be held at once while the rungs catch up with each other.
SHARED_WINDOW = 2


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
        tensor = reader.read_whole().reshape(reader.shape)
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

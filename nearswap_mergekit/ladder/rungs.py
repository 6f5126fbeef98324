"""The rows of a ladder: the base (the chain at t = 0), one rung per t, and the
reference rows (a secondary alone); and each chain rung's full-swap counts, taken
from the reads the ladder makes anyway."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set

import torch

from nearswap_mergekit.plan import planning, stats
from nearswap_mergekit.plan.measuring import measure
from nearswap_mergekit.plan.planning import Setting, TensorJob
from nearswap_mergekit.plan.reader import TensorRows

#: The label of the row every rung is compared with.
BASE_LABEL = "base"
#: Default longest window, where the model allows it.
DEFAULT_CONTEXT = 2048


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

"""A `nearswap_chain` recipe planned into tensor jobs, as mergekit's planner plans it.

mergekit's own planner resolves the recipe (models, slices, per-model t, filters,
layer gradients, dtype); its loader finds each tensor. `stats`, `calibrate` and
`ladder` all start from these jobs.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from nearswap_mergekit.method.registration import register
from nearswap_mergekit.plan.reader import RowReader, TensorRows, find_rows
from nearswap_mergekit.plan.recipe import RecipeError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Stage:
    model: str
    t: float


@dataclass
class TensorJob:
    """One output tensor: where its inputs are, and each stage's t."""

    name: str
    base_model: str
    stages: List[Stage]
    dtype: Optional[torch.dtype]
    round_stages: bool
    readers: Dict[str, "RowReader"] = field(default_factory=dict, repr=False)
    #: mergekit's task that aligns this tensor's token rows, if it has one.
    vocabulary_task: object = field(default=None, repr=False)

    def open(self) -> Dict[str, "RowReader"]:
        """Readers of the rows the merge compares: the files' rows, or, for a
        vocabulary-aligned tensor, those of mergekit's aligned tensors (read whole)."""
        if self.vocabulary_task is None:
            return self.readers
        from mergekit.graph import Executor
        from mergekit.io.tasks import LoaderCache

        ((_, aligned),) = Executor([self.vocabulary_task]).run(quiet=True)
        LoaderCache().flush_all()  # mergekit's loaders keep the last shard open
        return {str(model): TensorRows(tensor) for model, tensor in aligned.items()
                if str(model) in self.readers}

    @property
    def layer(self) -> Optional[int]:
        match = _LAYER.search(self.name)
        return int(match.group(1)) if match else None



def output_config(config, arch_info, options):
    """mergekit's config of the merged model. mergekit sets its `torch_dtype`,
    which transformers 5 answers with a deprecation warning each time; the warning
    is mergekit's, and the tools that plan a merge without running it keep it quiet."""
    from mergekit.merge import _model_out_config
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    finally:
        transformers_logging.set_verbosity(level)


def plan(config, options=None) -> List[TensorJob]:
    """Every output tensor of the recipe, as mergekit's planner resolves it."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    register("mergekit")  # a no-op where the start-up hook has done it
    options = options or MergeOptions()
    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    # mergekit's own loaders read the vocabulary-aligned tensors: lazily, one
    # tensor at a time, for .bin files too.
    LoaderCache().setup(options.model_copy(update={"lazy_unpickle": True}))
    out_config = output_config(config, arch_info, options)
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    jobs = []
    # plan_in_memory() fails in mergekit 0.1.5 (pydantic cannot validate its
    # Task[Tensor] field); plan_to_disk only builds tasks, and none is executed.
    for saved in planned.plan_to_disk(out_path=os.devnull):
        chain = _chain_of(getattr(saved, "tensor_task", None))
        if chain is None:
            continue  # the writer's finalize and tokenizer tasks
        task, order, base, t_of, round_stages = chain
        gather = getattr(task.gather_tensors, "gather_tensors", task.gather_tensors)
        # Embeddings and lm_head under `tokenizer:` (or --unsafe-truncate-embeddings)
        # reach the method through mergekit's vocabulary task, which aligns their
        # token rows; stats runs that same task on them.
        vocabulary = task.gather_tensors if task.gather_tensors is not gather else None
        readers = {}
        for model in order:
            info = gather.weight_info[model]
            reader = find_rows(model, [info.name, *(info.aliases or ()), *(info.tied_names or ())])
            if reader is not None:
                readers[str(model)] = reader
        if str(base) not in readers:
            continue  # a weight the base lacks: nothing NearSwap does to it
        stages = [
            Stage(str(model), float(t_of(model)))
            for model in order
            if model != base and str(model) in readers
        ]
        if not stages:
            continue  # passed through from the base
        base = str(base)
        shapes = {readers[name].shape for name in [base, *(s.model for s in stages)]}
        if len(shapes) > 1 and vocabulary is None:
            raise RecipeError(
                f"tensor {saved.tensor_name}: shapes differ between models: {sorted(shapes)}; "
                "where vocabularies differ, set `tokenizer:` in the recipe as the merge needs"
            )
        jobs.append(
            TensorJob(
                name=saved.tensor_name,
                base_model=base,
                stages=stages,
                dtype=getattr(torch, gather.dtype) if gather.dtype else None,
                round_stages=round_stages,
                readers=readers,
                vocabulary_task=vocabulary,
            )
        )
    return jobs


def _chain_of(task):
    """(task, model order, base, t of a model, round_stages) of a planned merge task,
    for mergekit 0.1.5's generic task and 0.1.4's nearswap_chain task; else None."""
    if hasattr(task, "model_order"):  # mergekit 0.1.5
        return (task, task.model_order, task.base_model,
                lambda model: task.input_parameters[model]["t"],
                bool(task.parameters.get("round_stages", True)))
    if hasattr(task, "thresholds"):  # mergekit 0.1.4, nearswap_mergekit.method.adapter_014
        thresholds = dict(zip(task.secondaries, task.thresholds))
        return (task, (task.base_model, *task.secondaries), task.base_model,
                thresholds.__getitem__, task.round_stages)
    return None


#: A setting gives each stage's t: (job, stage index) -> t.
Setting = Callable[[TensorJob, int], float]


def recipe_t(job: TensorJob, index: int) -> float:
    return job.stages[index].t


def stage_model(jobs: Sequence[TensorJob], index: int) -> str:
    """The secondary of stage `index` (the model most of its tensors come from)."""
    models = Counter(job.stages[index].model for job in jobs if index < len(job.stages))
    return models.most_common(1)[0][0] if models else ""

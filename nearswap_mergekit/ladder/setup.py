"""A ladder run made ready from a plan and what the user asked for: the merged
model's config and tokenizer, the windows of each text, the eval dtype, and the
rungs (each --t, each --target-swap calibrated to its global t, or the recipe's
own t), before any weight is read for scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from nearswap_mergekit.ladder import EVAL_DTYPES, families, passes, scoring
from nearswap_mergekit.ladder.engine import LadderRun
from nearswap_mergekit.ladder.output import execution_device, output_model
from nearswap_mergekit.ladder.rungs import (
    LadderError,
    Rung,
    global_rung,
    input_rung,
    recipe_rung,
)
from nearswap_mergekit.ladder.weights import empty_model
from nearswap_mergekit.plan import calibration
from nearswap_mergekit.plan.reader import ReadCount
from nearswap_mergekit.plan.recipe import Plan

#: Default longest window, where the model allows it.
DEFAULT_CONTEXT = 2048


@dataclass
class Request:
    """What the user asked the ladder for (the command's flags)."""

    texts: Sequence[str]
    contents: Sequence[str]
    ts: Sequence[float] = ()
    targets: Sequence[float] = ()
    context: Optional[int] = None
    batch: Optional[int] = None
    eval_dtype: Optional[str] = None
    device: str = "cpu"
    prompts: Sequence[str] = ()
    max_new_tokens: int = 32
    with_inputs: bool = False
    progress: bool = True
    #: --memory-budget in bytes (None: passes.choose_budget's default).
    memory_budget: Optional[int] = None
    #: Run the whole model per batch, as the ladder did before it was streamed.
    whole_model: bool = False
    #: lm-eval's requests recorded for --task (tasks.record): (type, args) pairs.
    records: Optional[Sequence[tuple]] = None


def prepare(plan: Plan, request: Request) -> Tuple[LadderRun, List[Rung], List[Rung]]:
    """The run, its rungs (sorted by t) and its reference rows; LadderError for input
    the ladder cannot use."""
    jobs = plan.jobs
    execution = execution_device(request.device)
    output = output_model(plan.config, plan.options)
    positions = output.positions
    context = request.context
    if context is None:
        context = min(DEFAULT_CONTEXT, positions or DEFAULT_CONTEXT)
    elif positions and context > positions:
        raise LadderError(f"--context {context} is more than the model's {positions} positions "
                          f"(max_position_embeddings): use --context {positions} or less")
    try:
        text_set = scoring.prepare(request.texts, request.contents, output.tokenizer, context)
    except scoring.TextError as error:
        raise LadderError(str(error)) from None
    request_set = None
    if request.records is not None:
        from nearswap_mergekit.ladder import requests

        try:
            request_set = requests.prepare(request.records, output.config, output.tokenizer)
        except ValueError as error:
            raise LadderError(f"--task: {error}") from None
    eval_dtype = request.eval_dtype
    if eval_dtype is None:
        recipe_dtype = plan.config.dtype if plan.config.dtype in EVAL_DTYPES else "float32"
        eval_dtype = "float32" if request.device == "cpu" else recipe_dtype
    rungs = [global_rung(t) for t in dict.fromkeys(request.ts)]
    targets = list(dict.fromkeys(request.targets))
    read_before = ReadCount.bytes_read
    if targets:
        found = calibration.global_ts_for_targets(jobs, targets, progress=request.progress)
        rungs += [global_rung(t, f"swap {100 * target:g}%") for target, (t, _) in zip(targets, found)]
    rungs.sort(key=lambda rung: rung.t)
    rungs = rungs or [recipe_rung(jobs)]
    setup = LadderRun(
        recipe=plan.path, config=plan.config, jobs=jobs, output=output, texts=text_set, context=context,
        batch=request.batch, device=execution, eval_dtype=getattr(torch, eval_dtype), prompts=request.prompts,
        max_new_tokens=request.max_new_tokens, progress=request.progress,
        bytes_read_calibration=ReadCount.bytes_read - read_before, requests=request_set,
    )
    # Every secondary of any tensor's chain, in chain order (slices may give a stage
    # to different models in different layers).
    secondaries = dict.fromkeys(stage.model for job in jobs for stage in job.stages)
    references = [input_rung(model) for model in secondaries] if request.with_inputs else []
    _choose_path(setup, request, rows=1 + len(rungs) + len(references))
    return setup, rungs, references


def _choose_path(setup: LadderRun, request: Request, rows: int) -> None:
    """Streamed layer by layer, within the memory budget, where the family allows;
    else the whole model per batch (said in the report's `path`)."""
    template = empty_model(setup.output.config, setup.eval_dtype)
    reason = "--whole-model" if request.whole_model else families.unsupported(template)
    if reason is not None:
        if request.memory_budget is not None:
            raise LadderError(f"--memory-budget splits the layer-by-layer loop into passes, and this "
                              f"ladder runs the whole model per batch ({reason}): leave --memory-budget out")
        setup.whole_model = reason
        return
    setup.memory_budget = passes.choose_budget(request.memory_budget, setup.device)
    # Too small a budget is bad input: said now, before any weight is read.
    passes.plan_passes(setup.windows, setup.batch, rows, template.config.hidden_size,
                       setup.eval_dtype, setup.memory_budget)

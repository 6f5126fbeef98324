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

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from tqdm import tqdm

from nearswap_mergekit.ladder import requests, scoring
from nearswap_mergekit.ladder.output import OutputModel
from nearswap_mergekit.ladder.rungs import Rung, SwapCounts, base_rung
from nearswap_mergekit.ladder.weights import (
    Aborted,
    InputReader,
    MergedHoldings,
    MergedWeights,
    SharedInputs,
    empty_model,
    weight_sources,
)
from nearswap_mergekit.plan.planning import TensorJob


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
    #: Bytes the hidden states of one pass may take (passes.choose_budget).
    memory_budget: Optional[int] = None
    #: Why the model runs whole, once per batch, instead of layer by layer (None: streamed).
    whole_model: Optional[str] = None
    #: Bytes of input files read to calibrate --target-swap, before any scoring.
    bytes_read_calibration: int = 0
    #: lm-eval's recorded requests and their windows (requests.RequestSet), or None.
    requests: Optional[object] = None

    @property
    def windows(self) -> list:
        """Every window to score: the texts', then the requests'."""
        return list(self.texts.windows) + (list(self.requests.windows) if self.requests else [])


def run(setup: LadderRun, rungs: Sequence[Rung]) -> dict:
    """Score the base row and every rung on every text; the `ladder` JSON report.
    Streamed layer by layer (layers.py) where the family allows, else the whole
    model per batch; --prompt continuations run whole either way."""
    from nearswap_mergekit.ladder import layers

    if setup.whole_model is not None:
        report = _run_whole(setup, rungs)
        report["path"] = f"whole model: {setup.whole_model}"
    else:
        report = layers.run(setup, rungs, setup.memory_budget)
    report["bytes_read_calibration"] = setup.bytes_read_calibration
    if setup.whole_model is None and setup.prompts:
        parties = [base_rung(), *rungs]
        models, maps, reader, _ = _hooked_models(setup, parties, lambda: None)
        for row, continuations in zip(report["rungs"], _continue_prompts(setup, parties, models, maps, reader)):
            row["continuations"] = continuations
        report["bytes_read_prompts"] = reader.bytes_read
    return report


def _hooked_models(setup: LadderRun, parties, merged, counts=None):
    """One model per row, built empty, with accelerate's offload hooks over a weights
    map that merges each weight when the forward reaches it."""
    from accelerate.hooks import attach_align_device_hook

    models = [empty_model(setup.output.config, setup.eval_dtype) for _ in parties]
    names = weight_sources(models[0], [job.name for job in setup.jobs])
    reader = InputReader(setup.jobs, setup.config, names, setup.device, counts)
    held = MergedHoldings()
    maps = []
    for party, model in zip(parties, models):
        weights = MergedWeights(names, party, setup.eval_dtype, setup.device, held, merged)
        attach_align_device_hook(model, execution_device=setup.device, offload=True, weights_map=weights)
        maps.append(weights)
    return models, maps, reader, held


def _run_whole(setup: LadderRun, rungs: Sequence[Rung]) -> dict:
    """The whole model per batch: every weight's inputs read once per batch, shared
    by the rows' forwards, which run in lockstep threads."""
    from nearswap_mergekit.ladder import layers

    started = time.perf_counter()
    parties = [base_rung(), *rungs]
    counts = SwapCounts(rungs, max(len(job.stages) for job in setup.jobs))
    groups = scoring.batches(setup.windows, setup.batch)
    bar_lock = threading.Lock()

    def merged() -> None:
        with bar_lock:
            bar.update(1)

    models, maps, reader, held = _hooked_models(setup, parties, merged, counts)
    bar = tqdm(total=len(groups) * len(parties) * len(maps[0]), unit="tensors", desc="merging",
               disable=not setup.progress)
    scores = [[scoring.Score() for _ in setup.texts.paths] for _ in parties]
    answers = [{} for _ in parties]  # per row: request pair -> answer
    with ThreadPoolExecutor(max_workers=len(parties), thread_name_prefix="nearswap-rung") as pool:
        for group in groups:
            ids = scoring.input_ids(group, setup.device)
            source = SharedInputs(reader, len(parties))
            for weights in maps:
                weights.source = source

            for_requests = isinstance(group[0], requests.RequestWindow)

            def forward(model, source=source, ids=ids, for_requests=for_requests):
                try:
                    with torch.inference_mode():
                        logits = model(input_ids=ids, use_cache=False).logits
                        return logits if for_requests else scoring.log_probs(logits)
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
            if for_requests:
                for row, logits in zip(answers, outcomes):
                    requests.add_batch(row, group, logits)
                continue
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
    report = {
        "recipe": setup.recipe,
        "context": setup.context,
        "batches": len(groups),
        "device": str(setup.device),
        "eval_dtype": str(setup.eval_dtype).removeprefix("torch."),
        "texts": setup.texts.describe(),
        "rungs": report_rungs,
        "passes": len(groups),
        "peak_bytes_held": held.peak,
        # Bytes asked of the input files while scoring, and then for the prompts.
        "bytes_read": bytes_scoring,
        # For the full-swap column, of weights no forward asked for (usually none).
        "bytes_read_counting": bytes_counting,
        "bytes_read_prompts": reader.bytes_read - bytes_scoring - bytes_counting,
        "wall_seconds": time.perf_counter() - started,
    }
    layers.add_request_scores(report, setup, answers)
    return report


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

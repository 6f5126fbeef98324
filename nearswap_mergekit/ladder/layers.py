"""The ladder streamed layer by layer: the inputs read once per pass, whatever the
amount of text.

Per pass (passes.py), stage by stage (families.py: the embedding, each decoder
layer, the final norm and the head): the stage's input weights are read once and
merged for every row (the base, each rung, each reference row), every window of
the pass runs through the stage, `--batch` windows at a time, row by row, and the
stage's merged weights are let go before the next stage is read. Hidden states
wait between stages, per row, on the execution device. A tied head's weight is
the embedding's: merged once in the embedding stage and held until the head.
lm-eval's requests (requests.py) are windows too, batched apart from the texts'
and answered at the head.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence

import torch
from tqdm import tqdm

from nearswap_mergekit.ladder import families, passes, requests, scoring
from nearswap_mergekit.ladder.rungs import Rung, SwapCounts, base_rung
from nearswap_mergekit.ladder.weights import (
    InputReader,
    MergedHoldings,
    MergedWeights,
    SharedInputs,
    empty_model,
    weight_sources,
)


def _place(model, name: str, value, device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(model, name, device, value=value)


def _load_stage(names: Sequence[str], models, maps, source: SharedInputs, device, tied: Dict) -> None:
    """Merge the stage's weights for every row, weight by weight: each weight's
    inputs are read once and shared by all rows, then let go."""
    for name in names:
        if name in tied:  # the head's weight of a tied model: the embedding, held
            for model, held in zip(models, tied[name]):
                _place(model, name, held, device)
            continue
        for weights in maps:
            weights.source = source
        for model, weights in zip(models, maps):
            _place(model, name, weights[name], device)


def _unload_stage(names: Sequence[str], models) -> None:
    for model in models:
        for name in names:
            _place(model, name, None, "meta")


def run(setup, rungs: Sequence[Rung], budget: int) -> dict:
    """Score the base row and every rung on every text, streamed; the `ladder`
    JSON report (as engine.run's, with `passes`, `hidden_state_bytes` and
    `memory_budget`)."""
    started = time.perf_counter()
    parties = [base_rung(), *rungs]
    models = [empty_model(setup.output.config, setup.eval_dtype) for _ in parties]
    template = models[0]
    names = weight_sources(template, [job.name for job in setup.jobs])
    by_stage = families.weights_by_stage(template)
    tied_name = "lm_head.weight" if families.tied_head(template) else None
    counts = SwapCounts(rungs, max(len(job.stages) for job in setup.jobs))
    reader = InputReader(setup.jobs, setup.config, names, setup.device, counts)
    held = MergedHoldings()
    hidden_size = template.config.hidden_size
    plan = passes.plan_passes(setup.windows, setup.batch, len(parties), hidden_size, setup.eval_dtype, budget)
    scores = [[scoring.Score() for _ in setup.texts.paths] for _ in parties]
    answers: List[Dict[int, tuple]] = [{} for _ in parties]  # per row: request pair -> answer
    stage_list = families.stages(template)
    bar = tqdm(total=len(plan) * len(stage_list), unit="stages", desc="streaming", disable=not setup.progress)
    batches = 0
    peak_hidden = 0
    with torch.inference_mode():
        for windows in plan:
            groups = scoring.batches(windows, setup.batch)
            batches += len(groups)
            # hidden[row][batch]: what the last stage left for the next.
            hidden: List[List[torch.Tensor]] = [[None] * len(groups) for _ in parties]
            maps = [MergedWeights(names, party, setup.eval_dtype, setup.device, held, lambda: None)
                    for party in parties]
            tied: Dict[str, List[torch.Tensor]] = {}
            for stage in stage_list:
                stage_names = by_stage[stage]
                source = SharedInputs(reader, len(parties))
                _load_stage(stage_names, models, maps, source, setup.device, tied)
                if stage == families.EMBEDDING and tied_name is not None:
                    tied[tied_name] = [model.model.embed_tokens.weight for model in models]
                for index, group in enumerate(groups):
                    if stage == families.HEAD:
                        _score_batch(models, hidden, index, group, scores, answers)
                        continue
                    ids = scoring.input_ids(group, setup.device) if stage == families.EMBEDDING else None
                    for row, model in enumerate(models):
                        given = ids if ids is not None else hidden[row][index]
                        hidden[row][index] = families.run_stage(model, stage, given)
                peak_hidden = max(peak_hidden, sum(h.nbytes for row in hidden for h in row if h is not None))
                _unload_stage([n for n in stage_names if n != tied_name or stage == families.HEAD], models)
                bar.update(1)
            del hidden, tied
    bar.close()
    bytes_scoring = reader.bytes_read
    for name in counts.missing(setup.jobs):  # planned, but no stage asked for it
        reader(name)
    full_swap = counts.fractions(setup.jobs)
    bytes_counting = reader.bytes_read - bytes_scoring
    report_rungs = [
        {
            "label": party.label,
            "t": party.t,
            "full_swap": full_swap.get(party.label),
            "texts": [score.report(path, size) for score, path, size
                      in zip(per_text, setup.texts.paths, setup.texts.sizes)],
        }
        for party, per_text in zip(parties, scores)
    ]
    report = {
        "recipe": setup.recipe,
        "context": setup.context,
        "path": "layers",
        "passes": len(plan),
        "batches": batches,
        "device": str(setup.device),
        "eval_dtype": str(setup.eval_dtype).removeprefix("torch."),
        "texts": setup.texts.describe(),
        "rungs": report_rungs,
        "peak_bytes_held": held.peak,
        "hidden_state_bytes": peak_hidden,
        "memory_budget": budget,
        "bytes_read": bytes_scoring,
        "bytes_read_counting": bytes_counting,
        "bytes_read_prompts": 0,
        "wall_seconds": time.perf_counter() - started,
    }
    add_request_scores(report, setup, answers)
    return report


def add_request_scores(report: dict, setup, answers: List[Dict[int, tuple]]) -> None:
    """The requests' description, and each row's answer per request pair under
    `request_scores` (for tasks.replay; not JSON: the command takes it out)."""
    if setup.requests is not None:
        report["requests"] = setup.requests.describe()
        count = setup.requests.pairs
        report["request_scores"] = [[row[i] for i in range(count)] for row in answers]


def _score_batch(models, hidden, index: int, group, scores, answers) -> None:
    """The head on one batch, the base row first (its log-probabilities are every
    rung's reference), each row's hidden states let go once scored. A batch of
    request windows: each row's answers (requests.add_batch)."""
    if isinstance(group[0], requests.RequestWindow):
        for row, model in enumerate(models):
            requests.add_batch(answers[row], group, families.run_stage(model, families.HEAD, hidden[row][index]))
            hidden[row][index] = None
        return
    base_logp = scoring.log_probs(families.run_stage(models[0], families.HEAD, hidden[0][index]))
    scoring.add_batch(scores[0], group, base_logp)
    hidden[0][index] = None
    for row in range(1, len(models)):
        logp = scoring.log_probs(families.run_stage(models[row], families.HEAD, hidden[row][index]))
        scoring.add_batch(scores[row], group, logp, base_logp)
        hidden[row][index] = None

"""One t of a recipe as an lm-eval model, merged on access and written nowhere, for
tooling that drives lm-eval from Python:

    import lm_eval
    from nearswap_mergekit.ladder.lm import merged_lm

    lm = merged_lm("quartet.yml", t=0.0001)
    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])["results"]

The model is lm-eval's own `hf` backend (HFLM) around transformers' model for the
merged config, built on the meta device, whose weights accelerate's offload hooks
fetch from a map that merges each weight when the forward reaches its module (as
`ladder --whole-model` does): every forward reads every input weight again. That
suits a few requests, or generation; to score many requests on several t, `ladder
--task` reads the inputs once for all of them and all the rungs.
"""

from __future__ import annotations

from typing import Optional

import torch


def merged_lm(recipe: str, t: Optional[float] = None, *, device: str = "cpu", dtype: str = "float32",
              batch_size: int = 1, **hflm_arguments):
    """An lm-eval `LM` (HFLM) for RECIPE with one global t (None: the recipe's own
    t), as `mergekit-yaml` would merge it; usable as `simple_evaluate(model=...)`.
    `hflm_arguments` go to HFLM (max_length, add_bos_token, ...). Needs the eval
    extra: pip install 'nearswap-mergekit[eval]'."""
    from accelerate.hooks import attach_align_device_hook
    from lm_eval.models.huggingface import HFLM
    from mergekit.options import MergeOptions

    from nearswap_mergekit.ladder.output import execution_device, output_model
    from nearswap_mergekit.ladder.rungs import global_rung, recipe_rung
    from nearswap_mergekit.ladder.weights import (
        InputReader,
        MergedHoldings,
        MergedWeights,
        SharedInputs,
        empty_model,
        weight_sources,
    )
    from nearswap_mergekit.plan.recipe import Plan

    plan = Plan(recipe, MergeOptions())
    jobs = plan.jobs
    where = execution_device(device)
    eval_dtype = getattr(torch, dtype)
    output = output_model(plan.config, plan.options)
    rung = recipe_rung(jobs) if t is None else global_rung(float(t))
    model = empty_model(output.config, eval_dtype)
    names = weight_sources(model, [job.name for job in jobs])
    reader = InputReader(jobs, plan.config, names, where)
    weights = MergedWeights(names, rung, eval_dtype, where, MergedHoldings(), lambda: None)
    attach_align_device_hook(model, execution_device=where, offload=True, weights_map=weights)

    def fresh_inputs(_module, _args):  # each forward reads its weights' inputs anew
        weights.source = SharedInputs(reader, 1)

    model.register_forward_pre_hook(fresh_inputs)
    lm = HFLM(pretrained=model, tokenizer=output.tokenizer, batch_size=batch_size, **hflm_arguments)
    # HFLM takes its device from the model's parameters, which stay on the meta device
    # between forwards: its inputs go where the weights are merged.
    lm._device = where
    return lm

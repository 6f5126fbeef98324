"""Swap statistics of a `nearswap_chain` recipe, read the way the merge reads it:
the report of `nearswap-mergekit stats`, per stage, per layer and per tensor.

The recipe is planned in nearswap_mergekit.plan.planning, its rows drawn in
nearswap_mergekit.plan.sampling and read in nearswap_mergekit.plan.measuring; `calibrate`
lives in nearswap_mergekit.plan.calibration.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Dict, Optional, Sequence

from nearswap_mergekit.method._fused import fused_available
from nearswap_mergekit.plan.measuring import measure
from nearswap_mergekit.plan.planning import Setting, TensorJob, recipe_t, stage_model
from nearswap_mergekit.plan.reader import Holdings
from nearswap_mergekit.plan.recipe import Plan
from nearswap_mergekit.plan.sampling import RowSums, summarize


def stage_report(jobs: Sequence[TensorJob], per_tensor: Dict[str, RowSums], index: int, setting: Setting):
    """The JSON record of one stage: overall, per layer and per tensor."""
    involved = [job for job in jobs if index < len(job.stages) and job.name in per_tensor]
    ts = Counter()
    for job in involved:
        sums = per_tensor[job.name]
        ts[setting(job, index)] += sums.rows * sums.row_len
    by_layer = defaultdict(list)
    for job in involved:
        by_layer[job.layer].append(per_tensor[job.name])
    return {
        "model": stage_model(involved, index),
        "t": ts.most_common(1)[0][0] if ts else float("nan"),
        "t_values": sorted(ts),
        **summarize([per_tensor[job.name] for job in involved]),
        "layers": [
            {"layer": layer, **summarize(sums)}
            for layer, sums in sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ],
        "tensors": [
            {"name": job.name, "t": setting(job, index), **summarize([per_tensor[job.name]])}
            for job in involved
        ],
    }


def stats_report(plan: Plan, ts: Sequence[Optional[float]], sample: float, progress=True,
                 seed: int = 0):
    """The `stats` report: for each t (None: the recipe's own), every stage."""
    jobs = plan.jobs
    settings = [recipe_t if t is None else (lambda job, k, t=t: t) for t in ts]
    fused_available()  # load (or build) the kernel first: that is not reading
    started = time.perf_counter()
    Holdings.peak = Holdings.held
    measured = measure(jobs, settings, sample, progress, seed=seed)
    return {
        "recipe": plan.path,
        "sample": sample,
        "seed": seed,
        "read_seconds": time.perf_counter() - started,
        # Tensor data held in memory at once, at most (memory-mapped rows excluded).
        "peak_bytes_held": Holdings.peak,
        "results": [
            {
                "t": t,
                "stages": [
                    stage_report(jobs, per_stage, index, setting)
                    for index, per_stage in enumerate(stages)
                ],
            }
            for t, setting, stages in zip(ts, settings, measured)
        ],
    }

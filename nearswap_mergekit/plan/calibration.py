"""`nearswap-mergekit calibrate`: the t that fully swaps a target share of the
weights per pass, per stage and as one global t, found by measuring the fraction
(the read pass of nearswap_mergekit.plan.measuring), never by interpolating it.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

from nearswap_mergekit.plan.measuring import measure
from nearswap_mergekit.plan.planning import TensorJob, stage_model
from nearswap_mergekit.plan.sampling import summarize


def _log_grid(low: float, high: float, count: int) -> List[float]:
    ratio = (high / low) ** (1 / (count - 1))
    return [low * ratio**i for i in range(count)]


#: The first grid of t every search measures: 0, then 1e-9 to 1, log-spaced.
COARSE_GRID = [0.0, *_log_grid(1e-9, 1.0, 28)]


def _fine_grid(fractions: Sequence[float], target: float) -> List[float]:
    """A finer log grid inside the coarse interval that brackets the target (the
    fraction grows with t), from the coarse grid's measured fractions."""
    coarse = COARSE_GRID
    above = next((i for i, f in enumerate(fractions) if f >= target), len(coarse) - 1)
    low = coarse[max(above - 1, 1)] if above > 0 else coarse[1] / 10
    return _log_grid(low, coarse[above] if above > 0 else coarse[1], 17)


def _closest(ts: Sequence[float], fractions: Sequence[float], target: float) -> Tuple[float, float]:
    """The measured (t, fraction) closest to the target; the smaller t on a tie."""
    return min(zip(ts, fractions), key=lambda tf: (abs(tf[1] - target), tf[0]))


def search_t(evaluate: Callable[[List[float]], List[float]], target: float) -> Tuple[float, float]:
    """The t whose fraction is closest to target, and that fraction: a coarse log grid,
    then a fine one inside the bracket (the fraction grows with t).

    evaluate: candidate t -> their measured fractions, in the same order."""
    fractions = evaluate(COARSE_GRID)
    fine = _fine_grid(fractions, target)
    return _closest(COARSE_GRID + fine, fractions + evaluate(fine), target)


def global_ts_for_targets(jobs: Sequence[TensorJob], targets: Sequence[float], sample: float = 1.0,
                          progress: bool = True, seed: int = 0) -> List[Tuple[float, float]]:
    """(global t, achieved mean full-swap fraction) per target: calibrate's search for
    its global t (the mean over stages of each stage's full-swap fraction, one t
    throughout), for all targets in two read passes: the coarse grid, then every
    target's fine grid together."""
    measured: Dict[float, float] = {}

    def mean_fraction(candidates: List[float]) -> List[float]:
        missing = [c for c in dict.fromkeys(candidates) if c not in measured]
        if missing:
            settings = [(lambda job, i, c=c: c) for c in missing]
            for candidate, per_stage in zip(missing, measure(jobs, settings, sample, progress, seed=seed)):
                fractions = [summarize(list(sums.values()))["full_swap_fraction"] for sums in per_stage]
                measured[candidate] = sum(fractions) / len(fractions)
        return [measured[c] for c in candidates]

    coarse = mean_fraction(COARSE_GRID)
    fines = [_fine_grid(coarse, target) for target in targets]
    mean_fraction([t for fine in fines for t in fine])
    return [_closest(COARSE_GRID + fine, coarse + mean_fraction(fine), target)
            for target, fine in zip(targets, fines)]


def calibrate(jobs: Sequence[TensorJob], target: float, sample: float = 1.0, progress=True,
              seed: int = 0):
    """Suggest t per stage (stage by stage, earlier stages at their suggested t) and
    one global t, so that the fraction fully swapped per pass is `target`."""
    if not 0 < target < 1:
        raise ValueError(f"--target-swap must be in (0, 1); got {target}")
    count = max(len(job.stages) for job in jobs)
    models = [stage_model(jobs, k) for k in range(count)]

    def fractions(settings, limit):
        measured = measure(jobs, settings, sample, progress, stages_limit=limit, seed=seed)
        return [[summarize(list(per_stage.values())) for per_stage in stages] for stages in measured]

    chosen: List[float] = []
    stages = []
    for k in range(count):
        def per_stage(candidates, k=k):
            settings = [
                (lambda job, i, c=c: chosen[i] if i < k else c) for c in candidates
            ]
            return [result[k]["full_swap_fraction"] for result in fractions(settings, k + 1)]

        t, achieved = search_t(per_stage, target)
        chosen.append(t)
        stages.append({"model": models[k], "t": t, "achieved_full_swap_fraction": achieved})

    ((global_t, global_achieved),) = global_ts_for_targets(jobs, [target], sample, progress, seed)
    at_global = fractions([lambda job, i: global_t], None)[0]
    for stage, result in zip(stages, at_global):
        stage["full_swap_fraction_at_global_t"] = result["full_swap_fraction"]
    return {
        "target": target,
        "global_t": global_t,
        "global_achieved_full_swap_fraction": global_achieved,
        "sample": sample,
        "method": (
            "Each stage's full-swap fraction grows with its t. Per stage, in chain order "
            "with earlier stages at their suggested t, the fraction is measured on a "
            "log-spaced grid of t (0 and 1e-9 to 1), then on a finer grid inside the "
            "bracketing interval; the t whose measured fraction is closest to the target "
            "is suggested. The global t is found the same way for the mean fraction over "
            "all stages with one t throughout. Achieved fractions are measured, not "
            "interpolated (estimates when sample < 1)."
        ),
        "stages": stages,
    }


#: calibrate --plot: points per stage, log-spaced from t / CURVE_SPAN to t * CURVE_SPAN.
CURVE_POINTS = 17
CURVE_SPAN = 100.0


def calibration_curves(jobs, result: dict, sample: float, seed: int, progress: bool) -> list:
    """Per stage, its full-swap fraction on a log grid of t around its chosen t, with
    earlier stages at their chosen t (as calibrate searched): one more read pass."""
    chosen = [stage["t"] for stage in result["stages"]]
    grids = []
    for t in chosen:
        centre = t if t > 0 else 1e-9 * CURVE_SPAN  # t = 0: the smallest t searched
        low = centre / CURVE_SPAN
        grid = [low * CURVE_SPAN ** (2 * i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)]
        grids.append(sorted({*grid, t}))
    cases = [(k, t) for k, grid in enumerate(grids) for t in grid]
    settings = [lambda job, i, k=k, t=t: t if i == k else chosen[i] for k, t in cases]
    measured = measure(jobs, settings, sample, progress, seed=seed)
    curves = [{"t": [], "full_swap_fraction": []} for _ in chosen]
    for (k, t), stages in zip(cases, measured):
        curves[k]["t"].append(t)
        fraction = summarize(list(stages[k].values()))["full_swap_fraction"]
        curves[k]["full_swap_fraction"].append(fraction)
    return curves

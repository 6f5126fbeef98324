"""How `stats --sample` picks rows, and whether its standard errors are honest:
in-process on in-memory tensors (stats' own reader of rows already in memory)."""

import math

import pytest
import torch
from conftest import mergekit_independent

from nearswap_mergekit import nearswap_chain
from nearswap_mergekit.plan import sampling
from nearswap_mergekit.plan.measuring import measure
from nearswap_mergekit.plan.planning import Stage, TensorJob, recipe_t
from nearswap_mergekit.plan.reader import TensorRows
from nearswap_mergekit.plan.sampling import sample_rows, summarize

pytestmark = mergekit_independent
T = 1e-3


def periodic_family(rows: int, period: int, cols: int = 64, stages: int = 3, seed: int = 0):
    """A base and secondaries, each 10 t away from the chain's result so far,
    except: every `period`-th row (a different offset per stage) is identical to
    it, and 0.5 % of weights at random are t/2 away (swapped)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=gen) * 0.02
    models, current = [base], base
    for k in range(stages):
        sign = torch.randint(0, 2, (rows, cols), generator=gen) * 2.0 - 1
        delta = 10 * T * sign
        near = torch.rand(rows, cols, generator=gen) < 0.005
        delta[near] = T / 2 * sign[near]
        delta[(k * 7) % period :: period] = 0
        models.append(current + delta)
        current = nearswap_chain(current, [models[-1]], T)
    return models


def job_of(models, name="model.layers.0.mlp.up_proj.weight"):
    readers = {f"m{i}": TensorRows(m) for i, m in enumerate(models)}
    stages = [Stage(f"m{i}", T) for i in range(1, len(models))]
    return TensorJob(name, "m0", stages, torch.float32, True, readers)


def stage_summaries(job, sample, seed=0):
    (per_setting,) = measure([job], [recipe_t], sample, progress=False, seed=seed)
    return [summarize([per_stage[job.name]]) for per_stage in per_setting]


KEYS = ("identical_fraction", "full_swap_fraction", "mean_abs_shift")


@pytest.mark.parametrize("period", [32, 64, 128])
@pytest.mark.parametrize(
    "sample, drawn",
    # 16,384 rows make 1,024 runs of 16 rows: 1/32 draws 32 of them; 1/100 and
    # 1/128 draw the floor of 30; 1/4 draws 256.
    [(1 / 32, 32), (1 / 100, sampling.MIN_SAMPLED_CLUSTERS), (1 / 128, sampling.MIN_SAMPLED_CLUSTERS),
     (1 / 4, 256)],
    ids=["1/32", "1/100 (floor)", "1/128 (floor)", "1/4"],
)
def test_periodic_rows_cannot_alias_the_sample(period, sample, drawn):
    """Every period-th row identical: a sample taking every k-th row would see all
    or none of them; random runs see their share, within 3 standard errors."""
    job = job_of(periodic_family(rows=16384, period=period))
    assert len(sample_rows(job.name, 16384, 64, sample).chosen) == drawn
    exact = stage_summaries(job, 1.0)
    sampled = stage_summaries(job, sample)
    for k, (e, s) in enumerate(zip(exact, sampled)):
        assert e["identical_fraction"] == pytest.approx(1 / period, abs=1e-9)
        for key in KEYS:
            assert s[key + "_se"] > 0
            errors = abs(s[key] - e[key]) / s[key + "_se"]
            assert errors <= 3, (k, key, s[key], e[key], s[key + "_se"])


def test_sample_reads_runs_of_rows_and_the_share_asked_for():
    chosen = sample_rows("model.layers.0.mlp.up_proj.weight", 16384, 64, 0.05)
    assert not chosen.exact and chosen.cluster_rows == 16
    assert len(chosen.chosen) == max(sampling.MIN_SAMPLED_CLUSTERS, math.ceil(0.05 * chosen.clusters))
    assert len(chosen.chosen) == len(chosen.strata)
    assert sum(chosen.strata) == chosen.clusters
    assert chosen.rows_read == len(chosen.chosen) * chosen.cluster_rows  # whole runs of rows
    assert sample_rows("x", 16384, 64, 1.0).exact


def test_a_shorter_last_run_is_read_as_far_as_the_tensor_goes():
    """16,390 rows in runs of 16: the last run holds 6 rows. Read whole, every row
    counts once; drawn, it is read to the tensor's end and no further."""
    rows = 16390
    models = periodic_family(rows=rows, period=64, stages=1)
    job = job_of(models)
    (exact,) = stage_summaries(job, 1.0)
    assert exact["elements"] == models[0].numel()
    assert exact["identical_fraction"] * exact["elements"] == (models[0] == models[1]).sum()
    seed = next(seed for seed in range(1000)
                if sample_rows(job.name, rows, 64, 1 / 32, seed).chosen[-1] == 1024)
    drawn = sample_rows(job.name, rows, 64, 1 / 32, seed)
    assert drawn.cluster_rows == 16 and drawn.clusters == 1025
    assert drawn.rows_read == (len(drawn.chosen) - 1) * 16 + 6
    (sampled,) = stage_summaries(job, 1 / 32, seed=seed)
    assert abs(sampled["identical_fraction"] - 1 / 64) <= 3 * sampled["identical_fraction_se"]


def test_samples_of_many_tensors_are_read_together_and_give_each_its_own_numbers():
    """Tensors of one row length share kernel calls; each tensor's numbers are the
    ones it gives when measured alone."""
    families = [periodic_family(rows=4096 + 512 * i, period=32 * (i + 1), stages=2, seed=i)
                for i in range(3)]
    jobs = [job_of(models, name=f"model.layers.{i}.mlp.up_proj.weight")
            for i, models in enumerate(families)]
    for sample in (1.0, 0.05):
        (together,) = measure(jobs, [recipe_t], sample, progress=False)
        for job in jobs:
            (alone,) = measure([job], [recipe_t], sample, progress=False)
            for stage_together, stage_alone in zip(together, alone):
                assert summarize([stage_together[job.name]]) == summarize([stage_alone[job.name]])


def test_same_seed_same_numbers_other_seed_other_rows():
    job = job_of(periodic_family(rows=12000, period=64, stages=1))
    first, again = stage_summaries(job, 0.02, seed=5), stage_summaries(job, 0.02, seed=5)
    assert first == again
    assert sample_rows(job.name, 12000, 64, 0.02, 5) != sample_rows(job.name, 12000, 64, 0.02, 6)


@pytest.mark.parametrize(
    "period, floor",
    # With rows identical every 128th row, a 1 % sample of 10,240 rows holds only a
    # handful of them, and the normal interval covers somewhat less often.
    [(32, 0.90), (128, 0.85)],
)
def test_ninety_five_percent_intervals_cover_the_exact_value(period, floor):
    """Over many seeds, estimate ± 1.96 SE covers the exact value (nominally 95 %)."""
    job = job_of(periodic_family(rows=10240, period=period, stages=2, seed=3))
    exact = stage_summaries(job, 1.0)
    seeds = 200
    covered = {key: 0 for key in KEYS}
    for seed in range(seeds):
        for e, s in zip(exact, stage_summaries(job, 0.01, seed=seed)):
            for key in KEYS:
                covered[key] += abs(s[key] - e[key]) <= 1.96 * s[key + "_se"]
    rates = {key: count / (seeds * len(exact)) for key, count in covered.items()}
    print(f"period {period}: coverage of the nominal 95 % interval over {seeds} seeds: {rates}")
    assert all(rate >= floor for rate in rates.values()), rates


def test_no_event_in_the_sample_is_reported_as_a_bound_not_as_certainty():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(20000, 64, generator=gen) * 0.02
    secondary = base + 10 * T
    secondary[12345, :3] = base[12345, :3]  # three identical weights in one row
    job = job_of([base, secondary])
    (exact,) = stage_summaries(job, 1.0)
    assert exact["identical_fraction"] == 3 / base.numel()
    (sampled,) = stage_summaries(job, 0.01, seed=0)
    assert sampled["identical_fraction"] == 0  # the one row was not drawn
    bound = sampled["identical_fraction_upper_95"]
    assert bound >= exact["identical_fraction"] and sampled["identical_fraction_se"] > 0
    assert bound == pytest.approx(3 / sampling.MIN_SAMPLED_CLUSTERS)  # the rule of three
    assert "identical_fraction_upper_95" not in exact


def test_tiny_tensors_are_read_whole():
    job = job_of([torch.randn(5, 8), torch.randn(5, 8)])
    (sampled,) = stage_summaries(job, 0.01)
    assert sampled["full_swap_fraction_se"] == 0 and sample_rows("x", 5, 8, 0.01).exact

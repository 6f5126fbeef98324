"""Swap statistics of a `nearswap_chain` recipe, read the way the merge reads it.

mergekit's own planner resolves the recipe (models, slices, per-model t, filters,
layer gradients, dtype); its loader finds each tensor; rows are read straight
from the safetensors files, all of them or, with `sample` < 1, runs of contiguous
rows drawn at random (cluster sampling, seeded), and run through the same
arithmetic as the merge, stage by stage.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import re
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from tqdm import tqdm

from nearswap_mergekit._fused import fused_available
from nearswap_mergekit.kernel import chain_with_row_stats
from nearswap_mergekit.reader import Holdings, RowReader, TensorRows, find_rows
from nearswap_mergekit.registration import register
from nearswap_mergekit.spec import METHOD_NAME
#: Elements per block of rows read and processed at once.
BLOCK_ELEMENTS = 1 << 20
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class RecipeError(ValueError):
    """A recipe that stats cannot work on; the message says why and how to fix it."""


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


def load_recipe(path: str):
    """Parse a recipe with mergekit's own MergeConfiguration."""
    from mergekit.config import MergeConfiguration

    register("mergekit")  # a no-op where the start-up hook has done it
    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path!r} does not exist")
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(Path(path).read_text()))
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path!r} is not valid YAML: {error}") from None
    except Exception as error:
        raise RecipeError(f"recipe {path!r} is not a mergekit recipe: {error}") from None
    if config.merge_method != METHOD_NAME:
        raise RecipeError(
            f"recipe {path!r} uses merge_method {config.merge_method!r}; "
            f"stats and calibrate work on {METHOD_NAME!r} recipes"
        )
    return config


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
    if hasattr(task, "thresholds"):  # mergekit 0.1.4, nearswap_mergekit.adapter_014
        thresholds = dict(zip(task.secondaries, task.thresholds))
        return (task, (task.base_model, *task.secondaries), task.base_model,
                thresholds.__getitem__, task.round_stages)
    return None


#: Rows are sampled in runs of contiguous rows ("clusters"): one read per run. A
#: cluster holds about this many elements, and a tensor has at least MIN_CLUSTERS
#: clusters where it has that many rows, so that a small sample still spans many.
CLUSTER_ELEMENTS = 1 << 14
MIN_CLUSTERS = 1000
#: At least this many clusters of each tensor are read (all of them, where fewer),
#: so that estimates rest on enough draws for a normal interval.
MIN_SAMPLED_CLUSTERS = 30


@dataclass(frozen=True)
class RowSample:
    """The rows of one tensor that are read: clusters of `cluster_rows` contiguous
    rows (the last may be shorter). The clusters are split into len(chosen) strata
    of consecutive clusters, and one cluster is drawn at random in each; strata[i]
    is the number of clusters in chosen[i]'s stratum."""

    rows: int
    cluster_rows: int
    chosen: Tuple[int, ...]
    strata: Tuple[int, ...]

    @property
    def clusters(self) -> int:
        return -(-self.rows // self.cluster_rows)

    @property
    def exact(self) -> bool:
        return len(self.chosen) == self.clusters

    @property
    def rows_read(self) -> int:
        if self.exact:
            return self.rows
        size = self.cluster_rows
        return sum(min(size, self.rows - cluster * size) for cluster in self.chosen)


def sample_rows(name: str, rows: int, row_len: int, sample: float, seed: int = 0) -> RowSample:
    """Every cluster of rows when sample == 1; else a fraction `sample` of them (at
    least MIN_SAMPLED_CLUSTERS), one drawn at random in each of that many strata
    of consecutive clusters (seeded by the tensor's name and `seed`). Random
    draws, unlike every k-th row, cannot fall in step with periodic structure such
    as attention heads; the strata spread the sample over the whole tensor."""
    cluster_rows = max(1, min(CLUSTER_ELEMENTS // max(row_len, 1), rows // MIN_CLUSTERS))
    clusters = -(-rows // cluster_rows)
    wanted = clusters if sample >= 1 else max(MIN_SAMPLED_CLUSTERS, math.ceil(sample * clusters))
    if wanted >= clusters:
        return RowSample(rows, cluster_rows, tuple(range(clusters)), (1,) * clusters)
    bounds = [h * clusters // wanted for h in range(wanted + 1)]
    # Python's Mersenne Twister gives the same draws for a seed on every platform.
    draw = random.Random(zlib.crc32(f"{seed}:{name}".encode())).random
    chosen, strata = [], []
    for low, high in zip(bounds, bounds[1:]):
        chosen.append(low + min(int(draw() * (high - low)), high - low - 1))
        strata.append(high - low)
    return RowSample(rows, cluster_rows, tuple(chosen), tuple(strata))


class RowSums:
    """One tensor's counts at one stage: the sums over the rows read, and, where
    rows were sampled, each stratum's estimated total (its drawn cluster's total
    times the stratum's size), from which totals and standard errors follow."""

    FIELDS = ("identical", "full", "moved", "shift", "nonfinite")

    def __init__(self, sample: RowSample, row_len: int, sums: Sequence[float],
                 strata_totals: Optional[torch.Tensor] = None):
        """sums: estimated totals in the order of FIELDS; strata_totals: a
        (len(FIELDS), strata) float64 tensor, for a sample (None when exact)."""
        self.rows, self.row_len = sample.rows, row_len
        self.exact, self.n = sample.exact, len(sample.chosen)
        self.sums = dict(zip(self.FIELDS, sums))
        self.strata_totals = strata_totals
        self._cached: Dict[str, Tuple[float, float]] = {}

    def total(self, key):
        """Estimated total over the whole tensor, and its variance."""
        if key not in self._cached:
            values = None if self.exact else self.strata_totals[self.FIELDS.index(key)]
            self._cached[key] = self.sums[key], self._variance(values)
        return self._cached[key]

    def _variance(self, values: Optional[torch.Tensor]) -> float:
        """Variance of a sum of stratum totals with one draw per stratum, by
        successive differences between neighbouring strata (conservative where
        neighbours are alike); zero when every cluster was read."""
        if self.exact or self.n < 2:
            return 0.0
        return self.n / (2 * (self.n - 1)) * float(values.diff().square().sum())

    def zero_event_bound(self) -> float:
        """A conservative 95 % upper bound on the number of elements with an event
        when none of the n sampled clusters showed one: at most 3/n of the clusters
        hold one (the rule of three), and at most all of such a cluster's elements."""
        return 0.0 if self.exact else min(1.0, 3 / max(self.n, 1)) * self.rows * self.row_len

    def ratio_terms(self, ratio):
        """Variance of total(shift) - ratio * total(moved), for the ratio estimate's SE."""
        if self.exact:
            return 0.0
        shift, moved = (self.strata_totals[self.FIELDS.index(k)] for k in ("shift", "moved"))
        return self._variance(shift - ratio * moved)


def summarize(sums: Sequence[RowSums]) -> Dict[str, float]:
    elements = sum(s.rows * s.row_len for s in sums)
    out = {"elements": elements}
    for key, label in (
        ("identical", "identical_fraction"),
        ("full", "full_swap_fraction"),
        ("nonfinite", "nonfinite_fraction"),
    ):
        totals = [s.total(key) for s in sums]
        value = sum(t for t, _ in totals)
        # A sampled tensor that showed no event adds its bound's variance, not zero.
        variance = sum(v if t or s.exact else (s.zero_event_bound() / 1.96) ** 2
                       for s, (t, v) in zip(sums, totals))
        out[label] = value / elements if elements else 0.0
        out[label + "_se"] = math.sqrt(variance) / elements if elements else 0.0
        if value == 0 and elements and not all(s.exact for s in sums):
            # None seen in the sample is no proof of none: report a bound, and a
            # standard error that puts it 1.96 standard errors above the estimate.
            bound = sum(s.zero_event_bound() for s in sums) / elements
            out[label + "_upper_95"] = bound
            out[label + "_se"] = bound / 1.96
    shift = sum(s.total("shift")[0] for s in sums)
    moved = sum(s.total("moved")[0] for s in sums)
    ratio = shift / moved if moved else 0.0
    out["mean_abs_shift"] = ratio
    out["mean_abs_shift_se"] = (
        math.sqrt(max(0.0, sum(s.ratio_terms(ratio) for s in sums))) / moved if moved else 0.0
    )
    out["moved_fraction"] = moved / elements if elements else 0.0
    return out


#: A setting gives each stage's t: (job, stage index) -> t.
Setting = Callable[[TensorJob, int], float]


def recipe_t(job: TensorJob, index: int) -> float:
    return job.stages[index].t


def measure(
    jobs: Sequence[TensorJob],
    settings: Sequence[Setting],
    sample: float = 1.0,
    progress: bool = True,
    stages_limit: Optional[int] = None,
    seed: int = 0,
) -> List[List[Dict[str, RowSums]]]:
    """Per setting, per stage: tensor name -> RowSums. Reads every input once.

    stages_limit runs only the first stages of the chain."""
    if not 0 < sample <= 1:
        raise ValueError(f"sample must be in (0, 1]; got {sample}")
    stages = max(len(job.stages) for job in jobs) if jobs else 0
    results = [[{} for _ in range(stages)] for _ in settings]

    def draw(job, readers) -> RowSample:
        base = readers[job.base_model]
        return _sample_rows(job.name, base.rows, base.row_len, sample, seed)

    planned = sum(draw(job, job.readers).rows_read * job.readers[job.base_model].row_len
                  for job in jobs)
    bar = tqdm(total=planned, unit="weights", unit_scale=True, desc="reading",
               disable=not progress)
    # Tensors whose rows stay readable without being held (safetensors files, or
    # in memory) are read together, many per kernel call, where their rows have the
    # same length and their arithmetic is the same: a sample of a few hundred
    # tensors then costs a few calls, not a few per tensor. The others (.bin
    # tensors, which are loaded whole; vocabulary-aligned ones, which mergekit
    # builds) are read one at a time and let go.
    groups: Dict[tuple, List[TensorJob]] = defaultdict(list)
    alone = []
    for job in jobs:
        if job.vocabulary_task is None and all(r.random_access for r in job.readers.values()):
            groups[_arithmetic(job, job.readers, settings, stages_limit)].append(job)
        else:
            alone.append(job)
    for key, members in groups.items():
        _read_together([(job, job.readers) for job in members], key, settings, draw, results, bar)
    for job in alone:
        readers = job.open()
        key = _arithmetic(job, readers, settings, stages_limit)
        _read_together([(job, readers)], key, settings, draw, results, bar)
        for reader in readers.values():
            reader.release()
    bar.close()
    return results


def _arithmetic(job, readers, settings, stages_limit) -> tuple:
    """What must be the same for tensors to share a kernel call: row length, the
    dtype computed in, rounding, and each stage's t under each setting."""
    count = len(job.stages[:stages_limit])
    base = readers[job.base_model]
    dtype = job.dtype or _promoted([base, *(readers[s.model] for s in job.stages[:count])])
    ts = tuple(tuple(setting(job, k) for k in range(count)) for setting in settings)
    return base.row_len, dtype, job.round_stages, count, ts


@dataclass
class _Part:
    """One tensor in a shared read: its readers (base first), its sample, and
    its cells in the accumulators (one per drawn cluster; one if read whole)."""

    job: TensorJob
    models: List[RowReader]
    sample: RowSample
    first_cell: int
    cells: int
    #: The rows to read and each one's cell; None where the tensor is read whole.
    index: Optional[torch.Tensor] = None
    cell: Optional[torch.Tensor] = None


@functools.lru_cache(maxsize=None)
def _gather_pool():
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="nearswap-read")


_sample_rows = functools.lru_cache(maxsize=4096)(sample_rows)


def _index_rows(parts: List["_Part"]) -> None:
    """Set each sampled part's rows to read and their cells, for all parts at once
    (a few tensor operations rather than a few per tensor)."""
    if not parts:
        return
    starts, lengths, cells = [], [], []
    for part in parts:
        size, rows = part.sample.cluster_rows, part.sample.rows
        for number, cluster in enumerate(part.sample.chosen):
            starts.append(cluster * size)
            lengths.append(min(size, rows - cluster * size))  # the last may be shorter
            cells.append(part.first_cell + number)
    counts = [part.sample.rows_read for part in parts]
    lengths = torch.tensor(lengths)
    before = lengths.cumsum(0) - lengths  # rows read before each cluster
    index = torch.arange(int(lengths.sum())) + torch.repeat_interleave(
        torch.tensor(starts) - before, lengths)
    cell = torch.repeat_interleave(torch.tensor(cells), lengths)
    for part, rows, their_cells in zip(parts, index.split(counts), cell.split(counts)):
        part.index, part.cell = rows, their_cells


def _read_together(members, key, settings, draw, results, bar) -> None:
    """Run the chain over the rows of several tensors of the same arithmetic,
    accumulating per-cluster counts (a sample) or per-tensor sums (an exact read)."""
    row_len, dtype, round_stages, count, ts = key
    parts: List[_Part] = []
    cells = 0
    for job, readers in members:
        base = readers[job.base_model]
        models = [base, *(readers[s.model] for s in job.stages[:count])]
        rows = draw(job, readers)
        size = 1 if rows.exact else len(rows.chosen)
        parts.append(_Part(job, models, rows, cells, size))
        cells += size
    _index_rows([part for part in parts if not part.sample.exact])
    fields = len(RowSums.FIELDS)
    # Counts are whole numbers far below 2**53: float64 holds them exactly.
    totals = torch.zeros((len(settings), fields, count, cells), dtype=torch.float64)

    @functools.lru_cache(maxsize=None)
    def scratch(position, kind):
        # One buffer per input, reused: a new one each block costs page faults.
        return torch.empty((block_rows, row_len), dtype=kind)

    def run(pieces):
        """The chain over pieces (part, first row, end row) read as one block."""
        if len(pieces) == 1 and pieces[0][0].index is None:  # views of the file
            part, low, high = pieces[0]
            blocks = [model.matrix()[low:high] for model in part.models]
            cell = torch.full((high - low,), part.first_cell)
        else:  # rows gathered straight into one block per model
            rows = [part.index[low:high] if part.index is not None
                    else torch.arange(low, high) for part, low, high in pieces]
            ends = list(itertools.accumulate(len(r) for r in rows))
            def gather(position):
                # A safetensors reader reads just these rows, by offset: a sample of a
                # cold checkpoint then reads about its own size from the disk.
                sources = [part.models[position] for part, _, _ in pieces]
                block = scratch(position, sources[0].dtype)[: ends[-1]]
                for source, index, start, end in zip(sources, rows, [0, *ends], ends):
                    source.read_rows(index, block[start:end])
                return block

            blocks = list(_gather_pool().map(gather, range(count + 1)))
            cell = torch.cat([part.cell[low:high] if part.cell is not None
                              else torch.full((high - low,), part.first_cell)
                              for part, low, high in pieces])
        v0, *secondaries = (block.to(dtype).contiguous() for block in blocks)
        for index, thresholds in enumerate(ts):
            counted = chain_with_row_stats(v0, secondaries, thresholds, round_stages=round_stages)
            for field_index, values in enumerate(counted):
                totals[index, field_index].index_add_(1, cell, values.to(torch.float64))
        bar.update(v0.numel())

    # A large tensor read whole is run in blocks of its own rows, views of the file
    # (no copy); sampled rows, and small tensors, are gathered into shared blocks.
    block_rows = max(1, BLOCK_ELEMENTS // max(row_len, 1))
    shared, shared_rows = [], 0
    for part in parts:
        rows = part.sample.rows_read
        if part.index is None and rows * 4 >= block_rows:
            for low in range(0, rows, block_rows):
                run([(part, low, min(low + block_rows, rows))])
            continue
        low = 0
        while low < rows:
            high = min(rows, low + block_rows - shared_rows)
            shared.append((part, low, high))
            shared_rows += high - low
            low = high
            if shared_rows == block_rows:
                run(shared)
                shared, shared_rows = [], 0
    if shared:
        run(shared)

    # Per cell, its stratum's size: a drawn cluster stands for its stratum.
    sizes = torch.cat([torch.ones(1, dtype=torch.float64) if part.index is None
                       else torch.tensor(part.sample.strata, dtype=torch.float64) for part in parts])
    owner = torch.repeat_interleave(torch.tensor([part.cells for part in parts]))
    for index in range(len(settings)):
        expanded = totals[index] * sizes
        sums = torch.zeros((fields, count, len(parts)), dtype=torch.float64)
        sums = sums.index_add_(2, owner, expanded).tolist()
        for number, part in enumerate(parts):
            for k in range(count):
                strata = None if part.index is None else expanded[:, k, part.first_cell : part.first_cell + part.cells]
                results[index][k][part.job.name] = RowSums(
                    part.sample, row_len, [sums[f][k][number] for f in range(fields)], strata
                )


def _promoted(readers) -> torch.dtype:
    dtype = None
    for reader in readers:
        current = reader.dtype
        dtype = current if dtype is None else torch.promote_types(dtype, current)
    return dtype


def stage_model(jobs: Sequence[TensorJob], index: int) -> str:
    """The secondary of stage `index` (the model most of its tensors come from)."""
    models = Counter(job.stages[index].model for job in jobs if index < len(job.stages))
    return models.most_common(1)[0][0] if models else ""


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


def stats_report(recipe: str, jobs, ts: Sequence[Optional[float]], sample: float, progress=True,
                 seed: int = 0):
    """The `stats` report: for each t (None: the recipe's own), every stage."""
    settings = [recipe_t if t is None else (lambda job, k, t=t: t) for t in ts]
    fused_available()  # load (or build) the kernel first: that is not reading
    started = time.perf_counter()
    Holdings.peak = Holdings.held
    measured = measure(jobs, settings, sample, progress, seed=seed)
    return {
        "recipe": recipe,
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


def _log_grid(low: float, high: float, count: int) -> List[float]:
    ratio = (high / low) ** (1 / (count - 1))
    return [low * ratio**i for i in range(count)]


def _search(evaluate: Callable[[List[float]], List[float]], target: float):
    """The t whose fraction is closest to target: a coarse log grid, then a fine one
    inside the bracket (the fraction grows with t)."""
    coarse = [0.0, *_log_grid(1e-9, 1.0, 28)]
    fractions = evaluate(coarse)
    above = next((i for i, f in enumerate(fractions) if f >= target), len(coarse) - 1)
    low = coarse[max(above - 1, 1)] if above > 0 else coarse[1] / 10
    fine = _log_grid(low, coarse[above] if above > 0 else coarse[1], 17)
    candidates = list(zip(coarse + fine, fractions + evaluate(fine)))
    return min(candidates, key=lambda tf: (abs(tf[1] - target), tf[0]))


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

        t, achieved = _search(per_stage, target)
        chosen.append(t)
        stages.append({"model": models[k], "t": t, "achieved_full_swap_fraction": achieved})

    def mean_fraction(candidates):
        settings = [(lambda job, i, c=c: c) for c in candidates]
        return [sum(r["full_swap_fraction"] for r in result) / len(result) for result in fractions(settings, None)]

    global_t, global_achieved = _search(mean_fraction, target)
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

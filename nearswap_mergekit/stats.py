"""Swap statistics of a `nearswap_chain` recipe, read the way the merge reads it.

mergekit's own planner resolves the recipe (models, slices, per-model t, filters,
layer gradients, dtype); its loader finds each tensor; rows are read straight
from the safetensors files, all of them or, with `sample` < 1, runs of contiguous
rows drawn at random (cluster sampling, seeded), and run through the same
arithmetic as the merge, stage by stage.
"""

from __future__ import annotations

import functools
import math
import os
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

from nearswap_mergekit.kernel import chain_with_row_stats
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

    register()  # a no-op where the start-up hook has done it
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


class Holdings:
    """Bytes of tensor data that stats holds in memory at once (memory-mapped
    safetensors rows excluded: the page cache holds those), and the peak."""

    held = 0
    peak = 0

    @classmethod
    def add(cls, nbytes: int) -> None:
        cls.held += nbytes
        cls.peak = max(cls.peak, cls.held)


class RowReader:
    """Rows of one tensor of one model, read through mergekit's loader index.

    safetensors tensors are memory-mapped (safetensors maps the file and reads
    nothing until rows are touched), so a sample reads only its rows. A pickled
    (.bin) tensor is read whole, lazily, by mergekit's lazy unpickler, on the first
    read, and let go by release(): one tensor per model at a time.
    """

    def __init__(self, model, names: Sequence[str]):
        from mergekit.io.tasks import LoaderCache

        loader = LoaderCache().get(model)
        self.name = next((n for n in names if n in loader.index.tensor_paths), None)
        self._tensor: Optional[torch.Tensor] = None
        self._held = 0
        if self.name is None:
            self.shape = None
            return
        path = loader.index.tensor_paths[self.name]
        self.path = path if os.path.isabs(path) else os.path.join(loader.index.base_path, path)
        self.safetensors = loader.index.is_safetensors
        if self.safetensors:
            self.shape = tuple(_safetensors_file(self.path).get_slice(self.name).get_shape())
        else:
            self.shape = tuple(_pickled_shard(self.path).index[self.name].shape)
        self._set_shape()

    def _set_shape(self):
        self.rows = self.shape[0] if len(self.shape) >= 2 else 1
        self.row_len = math.prod(self.shape[1:]) if len(self.shape) >= 2 else math.prod(self.shape)

    def _load(self) -> torch.Tensor:
        if self.safetensors:
            return _safetensors_file(self.path).get_tensor(self.name)
        tensor = _pickled_shard(self.path).get_tensor(self.name)
        self._held = tensor.numel() * tensor.element_size()
        Holdings.add(self._held)
        return tensor

    def matrix(self) -> torch.Tensor:
        """The whole tensor as (rows, row_len), a view of the file where it can be."""
        if self._tensor is None:
            self._tensor = self._load().reshape(self.rows, self.row_len)
        return self._tensor

    def read(self, rows: range) -> torch.Tensor:
        """The given contiguous rows as a (rows, row_len) tensor (a view where it can be)."""
        return self.matrix()[rows.start : rows.stop]

    def release(self) -> None:
        """Let go of the tensor (read again on the next read)."""
        self._tensor = None
        Holdings.add(-self._held)
        self._held = 0


class TensorRows(RowReader):
    """Rows of a tensor already in memory (one aligned by mergekit's vocabulary task)."""

    def __init__(self, tensor: torch.Tensor):
        self.name, self.path, self.shape = None, None, tuple(tensor.shape)
        self._set_shape()
        self._tensor = tensor.reshape(self.rows, self.row_len)
        self._held = tensor.numel() * tensor.element_size()
        Holdings.add(self._held)

    def release(self) -> None:
        """Stop counting the tensor as held (whoever made this reader drops it)."""
        Holdings.add(-self._held)
        self._held = 0


@functools.lru_cache(maxsize=64)
def _safetensors_file(path: str):
    """One open safetensors file (its header parsed once); tensors map lazily."""
    from safetensors import safe_open

    return safe_open(path, framework="pt")


@functools.lru_cache(maxsize=None)
def _pickled_shard(path: str):
    """mergekit's lazy unpickler for one .bin shard: it reads the pickle's index
    (names, shapes, offsets) now and each tensor only when asked for it."""
    from mergekit.io.loader import TensorLoader

    return TensorLoader.get(path, use_lazy_unpickle=True)


def plan(config, options=None) -> List[TensorJob]:
    """Every output tensor of the recipe, as mergekit's planner resolves it."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    register()  # a no-op where the start-up hook has done it
    options = options or MergeOptions()
    config = config.model_copy(deep=True)
    arch_info = get_architecture_info(config, options)
    # mergekit's own loaders read the vocabulary-aligned tensors: lazily, one
    # tensor at a time, for .bin files too.
    LoaderCache().setup(options.model_copy(update={"lazy_unpickle": True}))
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
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
            reader = RowReader(model, [info.name, *(info.aliases or ()), *(info.tied_names or ())])
            if reader.shape is not None:
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

    def batches(self, max_rows: int) -> List[List[range]]:
        """reads(max_rows) grouped into batches of at most max_rows rows in all, so
        that many small runs are processed together."""
        out: List[List[range]] = []
        size = max_rows
        for run in self.reads(max_rows):
            if size + len(run) > max_rows:
                out.append([])
                size = 0
            out[-1].append(run)
            size += len(run)
        return out

    def reads(self, max_rows: int) -> List[range]:
        """Row ranges to read: chosen clusters, adjacent ones merged up to max_rows."""
        out: List[range] = []
        for cluster in self.chosen:
            start = cluster * self.cluster_rows
            stop = min(start + self.cluster_rows, self.rows)
            last = out[-1] if out else None
            if last is not None and last.stop == start and stop - last.start <= max_rows:
                out[-1] = range(last.start, stop)
            else:
                out.append(range(start, stop))
        return out


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
    sizes = [high - low for low, high in zip(bounds, bounds[1:])]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    draws = torch.rand(wanted, generator=generator, dtype=torch.float64).tolist()
    chosen = tuple(low + min(int(u * size), size - 1) for low, size, u in zip(bounds, sizes, draws))
    return RowSample(rows, cluster_rows, chosen, tuple(sizes))


class RowSums:
    """Per tensor and field, each stratum's estimated total (its drawn cluster's total
    times the stratum's size, in stratum order): enough for estimated totals and
    their standard errors. Where every cluster is read, only the sums are kept."""

    FIELDS = ("identical", "full", "moved", "shift", "nonfinite")

    def __init__(self, sample: RowSample, row_len: int):
        self.rows, self.row_len = sample.rows, row_len
        self.exact, self.strata = sample.exact, sample.strata
        self.totals: Dict[str, List[float]] = {key: [] for key in self.FIELDS}
        self.sums: Dict[str, float] = dict.fromkeys(self.FIELDS, 0.0)
        self.n = 0
        self._cached: Dict[str, Tuple[float, float]] = {}

    def add(self, *per_cluster):
        """Add the totals of the next clusters in stratum order, in the order of FIELDS."""
        self._cached.clear()
        count = len(per_cluster[0])
        sizes = torch.tensor(self.strata[self.n : self.n + count], dtype=torch.float64)
        self.n += count
        for key, value in zip(self.FIELDS, per_cluster):
            expanded = value.to(torch.float64) * sizes
            self.sums[key] += expanded.sum().item()
            if not self.exact:  # the variance needs each stratum's total
                self.totals[key].extend(expanded.tolist())

    def total(self, key):
        """Estimated total over the whole tensor, and its variance."""
        if key not in self._cached:
            self._cached[key] = self.sums[key], self._variance(self.totals[key])
        return self._cached[key]

    def _variance(self, values: Sequence[float]) -> float:
        """Variance of a sum of stratum totals with one draw per stratum, by
        successive differences between neighbouring strata (conservative where
        neighbours are alike); zero when every cluster was read."""
        n = len(values)
        if self.exact or n < 2:
            return 0.0
        squares = math.fsum((b - a) * (b - a) for a, b in zip(values, values[1:]))
        return n / (2 * (n - 1)) * squares

    def zero_event_bound(self) -> float:
        """A conservative 95 % upper bound on the number of elements with an event
        when none of the n sampled clusters showed one: at most 3/n of the clusters
        hold one (the rule of three), and at most all of such a cluster's elements."""
        return 0.0 if self.exact else min(1.0, 3 / max(self.n, 1)) * self.rows * self.row_len

    def ratio_terms(self, ratio):
        """Variance of total(shift) - ratio * total(moved), for the ratio estimate's SE."""
        z = [s - ratio * c for s, c in zip(self.totals["shift"], self.totals["moved"])]
        return self._variance(z)


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

    def planned_elements(job):  # for the progress bar; aligned tensors may differ a little
        base = job.readers[job.base_model]
        rows = sample_rows(job.name, base.rows, base.row_len, sample, seed)
        return len(rows.chosen) * rows.cluster_rows * base.row_len

    planned = {job.name: planned_elements(job) for job in jobs}
    bar = tqdm(total=sum(planned.values()), unit="weights", unit_scale=True,
               desc="reading", disable=not progress)
    for job in jobs:
        readers = job.open()
        base = readers[job.base_model]
        models = [readers[stage.model] for stage in job.stages[:stages_limit]]
        dtype = job.dtype or _promoted([base, *models])
        rows = sample_rows(job.name, base.rows, base.row_len, sample, seed)
        for setting_index, setting in enumerate(settings):
            for k in range(len(models)):
                results[setting_index][k][job.name] = RowSums(rows, base.row_len)
        for batch in rows.batches(max(1, BLOCK_ELEMENTS // max(base.row_len, 1))):
            index = torch.cat([torch.arange(r.start, r.stop) for r in batch])
            v0, *secondaries = (_gather(m, batch).to(dtype).contiguous() for m in [base, *models])
            # Each row's cluster, numbered 0, 1, ... in the order the batch holds them.
            cluster = torch.unique_consecutive(index // rows.cluster_rows, return_inverse=True)[1]
            count = int(cluster[-1]) + 1
            for setting_index, setting in enumerate(settings):
                ts = [setting(job, k) for k in range(len(models))]
                stats = chain_with_row_stats(v0, secondaries, ts, round_stages=job.round_stages)
                for k in range(len(models)):
                    per_cluster = [
                        torch.zeros(count, dtype=x.dtype).index_add_(0, cluster, x[k]) for x in stats
                    ]
                    results[setting_index][k][job.name].add(*per_cluster)
        for reader in readers.values():
            reader.release()
        bar.update(planned[job.name])
    bar.close()
    return results


def _gather(reader, runs: List[range]) -> torch.Tensor:
    """The rows of several runs, one after the other (slices of the memory map)."""
    if len(runs) == 1:
        return reader.read(runs[0])
    matrix = reader.matrix()
    return torch.cat([matrix[run.start : run.stop] for run in runs])


def _promoted(readers) -> torch.dtype:
    dtype = None
    for reader in readers:
        current = reader.read(range(0, 1)).dtype
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

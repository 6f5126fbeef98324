"""The read pass: the rows of every tensor job read once and run through the merge's
arithmetic, stage by stage, under one or several settings of t.

Rows are read straight from the safetensors files, all of them or, with `sample`
< 1, the runs of contiguous rows the row sample draws (nearswap_mergekit.plan.sampling),
and counted per tensor.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from nearswap_mergekit.method.kernel import chain_with_row_stats
from nearswap_mergekit.plan.planning import Setting, TensorJob
from nearswap_mergekit.plan.reader import RowReader
from nearswap_mergekit.plan.sampling import RowSample, RowSums, sample_rows

#: Elements per block of rows read and processed at once.
BLOCK_ELEMENTS = 1 << 20


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
    dtype = compute_dtype(job, [r.dtype for r in (base, *(readers[s.model] for s in job.stages[:count]))])
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


def compute_dtype(job: TensorJob, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype a job's rows are counted in: the recipe's, else its inputs' promoted one."""
    return job.dtype or functools.reduce(torch.promote_types, dtypes)

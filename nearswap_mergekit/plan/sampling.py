"""Which rows a read takes, and what the counts over them say.

Rows are sampled in runs of contiguous rows drawn at random (cluster sampling,
stratified, seeded); the counts over them give estimated totals and their
standard errors, summarized per stage, layer or tensor.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

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
    """Fractions identical, fully swapped and non-finite, the mean |shift| of the
    weights that moved, and each one's standard error, over some tensors' sums."""
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

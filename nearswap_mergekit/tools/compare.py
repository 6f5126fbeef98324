"""Is this merge the published one, and did `--cuda` give the CPU's bits?

`compare` reads two checkpoints tensor by tensor and says, per tensor, what
fraction of elements is bit-identical, the largest |difference| and the largest
distance in ULPs; `hash` writes a manifest of per-tensor SHA-256 digests that
can be published beside a model and compared against without the model.

Checkpoints are read through mergekit's own index and loader (safetensors,
sharded or not, and pickled .bin), one tensor per side at a time; safetensors
tensors are memory-mapped, so a row sample touches only its rows (and what the
operating system reads ahead around them).

Definitions used throughout:

- identical: the two elements have the same bits. A NaN equals a NaN with the
  same bits; -0.0 and +0.0 differ.
- max |diff|: the largest |a - b| in float64 over the elements that are not NaN
  on either side (differing elements with a NaN are counted apart, as NaN
  mismatches).
- ULP distance (floating-point dtypes): |ord(a) - ord(b)|, where ord maps a
  float's bits to an integer that counts representable values in order
  (sign-magnitude to two's complement). -0.0 and +0.0 are the same number and
  0 ULP apart, although they are not identical; the largest finite number and
  infinity are 1 ULP apart. Exact, except float64 distances across zero beyond
  2**53 ULP, which are rounded.
- tensor digest: see nearswap_mergekit.tools.checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from nearswap_mergekit.plan.sampling import sample_rows
from nearswap_mergekit.tools.checkpoints import (
    _BITS,
    BLOCK_ELEMENTS,
    NAMED_IN_VERDICT,
    Checkpoint,
    InputError,
    Manifest,
    Side,
    dtype_name,
    natural_key,
    tensor_digest,
)


@dataclass
class TensorComparison:
    """One tensor name and what is known about its two sides."""

    name: str
    #: identical, differs, only in A, only in B, dtype differs, shape differs
    status: str
    dtype: Tuple[Optional[str], Optional[str]] = (None, None)
    shape: Tuple[Optional[list], Optional[list]] = (None, None)
    #: Elements compared (those of the sampled rows with --sample); None from a digest.
    elements: Optional[int] = None
    identical_elements: Optional[int] = None
    max_abs_diff: Optional[float] = None
    max_ulp: Optional[int] = None
    #: Differing elements with a NaN on either side (left out of max |diff| and ULP).
    nan_mismatches: Optional[int] = None
    #: Index of the first differing element compared.
    first_difference: Optional[list] = None
    #: True where only the digests were compared (a manifest side).
    by_digest: bool = False

    @property
    def identical_fraction(self) -> Optional[float]:
        if self.identical_elements is None:
            return None
        return self.identical_elements / self.elements if self.elements else 1.0

    def detail(self) -> str:
        """One human line on how the tensor differs."""
        a, b = self.dtype
        if self.status in ("only in A", "only in B"):
            return self.status
        if self.status == "shape differs":
            return f"shape {self.shape[0]} in A, {self.shape[1]} in B"
        parts = [f"dtype {a} in A, {b} in B"] if self.status == "dtype differs" else []
        if self.by_digest:
            parts.append("differs (by SHA-256; no per-element detail from a manifest)")
        if self.identical_elements is not None:
            parts.append(f"{100 * self.identical_fraction:.4f}% identical "
                         f"({self.identical_elements:,} of {self.elements:,})")
        if self.max_abs_diff is not None:
            parts.append(f"max |diff| {self.max_abs_diff:.4g}")
        if self.max_ulp is not None:
            parts.append(f"max {self.max_ulp:,} ULP")
        if self.nan_mismatches:
            parts.append(_nan_mismatches(self.nan_mismatches))
        if self.first_difference is not None:
            parts.append(f"first at {self.first_difference}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        record = asdict(self)
        record["identical_fraction"] = self.identical_fraction
        return record


def _nan_mismatches(count: int) -> str:
    return f"{count:,} NaN mismatch" + ("es" if count != 1 else "")


@dataclass
class _Tally:
    """Running totals over the blocks of one tensor."""

    elements: int = 0
    identical: int = 0
    max_abs_diff: Optional[float] = None
    max_ulp: Optional[int] = None
    nan_mismatches: int = 0
    first_difference: Optional[int] = None

    def diff(self, value: float) -> None:
        self.max_abs_diff = value if self.max_abs_diff is None else max(self.max_abs_diff, value)

    def ulp(self, value: int) -> None:
        self.max_ulp = value if self.max_ulp is None else max(self.max_ulp, value)


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """Float bits (an integer view) as integers in the order of the floats: consecutive
    representable values are consecutive integers; -0.0 and +0.0 are both 0. int32 for
    floats of up to 16 bits, int64 above."""
    wide = bits.to(torch.int32 if bits.element_size() <= 2 else torch.int64, copy=True)
    # Sign-magnitude to two's complement: where negative, -(magnitude).
    sign = wide >> (8 * wide.element_size() - 1)  # all ones where negative
    wide ^= sign & ((1 << (8 * bits.element_size() - 1)) - 1)
    wide -= sign
    return wide


def _ulp_distances(bits_a: torch.Tensor, bits_b: torch.Tensor) -> torch.Tensor:
    """|ord(a) - ord(b)| per element: integers, or float64 for float64 inputs."""
    oa, ob = _ordered(bits_a), _ordered(bits_b)
    if bits_a.element_size() < 8:
        return oa.sub_(ob).abs_()
    # Across zero a float64 distance may not fit in int64 (and is huge anyway).
    across = ((oa > 0) & (ob < 0)) | ((oa < 0) & (ob > 0))
    return torch.where(across, oa.double().abs() + ob.double().abs(), (oa - ob).abs_().double())


def _as_numbers(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.complex128 if values.is_complex() else torch.float64)


def _tally_block(a: torch.Tensor, b: torch.Tensor, offset: int, tally: _Tally) -> None:
    """Add one block (1-D, same length) to the tally. With the same dtype, elements are
    compared by their bits; with different dtypes, only by their values."""
    tally.elements += a.numel()
    same_dtype = a.dtype == b.dtype
    differ = None  # None: every element left in a and b differs or is compared by value
    if same_dtype:
        bits_a, bits_b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
        if torch.equal(bits_a, bits_b):  # the usual case, about 5x faster than counting
            tally.identical += a.numel()
            return
        differ = bits_a != bits_b
        count = int(torch.count_nonzero(differ))  # (a bool sum() is ~25x slower)
        tally.identical += a.numel() - count
        if tally.first_difference is None:
            tally.first_difference = offset + int(differ.view(torch.uint8).argmax())
        if 8 * count < a.numel():  # a few differ: pick them out; else mask (no copies)
            a, b, bits_a, bits_b = a[differ], b[differ], bits_a[differ], bits_b[differ]
            differ = None
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = a.isnan(), b.isnan()
    else:
        nan_a = nan_b = torch.zeros(a.shape, dtype=torch.bool)
    nan = nan_a | nan_b
    if not same_dtype:  # a NaN on both sides agrees in value
        mismatched = nan_a != nan_b
    else:  # differing bits with a NaN on either side
        mismatched = nan if differ is None else nan & differ
    tally.nan_mismatches += int(torch.count_nonzero(mismatched))
    if not a.numel():
        return
    # NaN here is a NaN side (counted above) or the same infinity twice (0 apart).
    diff = (_as_numbers(a) - _as_numbers(b)).abs_().nan_to_num_(nan=0.0, posinf=math.inf)
    tally.diff(float(diff.max()))
    if same_dtype and a.is_floating_point():
        tally.ulp(int(_ulp_distances(bits_a, bits_b).masked_fill_(nan, 0).max()))


def _element_ranges(name: str, shape: Sequence[int], sample: float, seed: int) -> List[Tuple[int, int]]:
    """The flat element ranges to compare: all, or the rows of the stats row sample
    (runs of contiguous rows, one drawn at random per stratum; the same F, seed and
    tensor name give the same rows on both sides and as in `stats`)."""
    numel = math.prod(shape)
    if sample >= 1:
        return [(0, numel)] if numel else []
    rows = shape[0] if len(shape) >= 2 else 1
    row_len = numel // rows if rows else 0
    drawn = sample_rows(name, rows, row_len, sample, seed)
    size = drawn.cluster_rows
    return [(cluster * size * row_len, min(rows, (cluster + 1) * size) * row_len)
            for cluster in drawn.chosen]


def _tally_tensors(name: str, a: torch.Tensor, b: torch.Tensor, sample: float, seed: int) -> _Tally:
    tally = _Tally()
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    for low, high in _element_ranges(name, list(a.shape), sample, seed):
        for start in range(low, high, BLOCK_ELEMENTS):
            end = min(high, start + BLOCK_ELEMENTS)
            _tally_block(flat_a[start:end].contiguous(), flat_b[start:end].contiguous(), start, tally)
    return tally


def _unravel(flat_index: Optional[int], shape: Sequence[int]) -> Optional[list]:
    if flat_index is None:
        return None
    index = []
    for size in reversed(shape):
        flat_index, position = divmod(flat_index, size)
        index.append(position)
    return index[::-1]


def _entry(side: Side, name: str, tensor: Optional[torch.Tensor]) -> Tuple[str, list]:
    if isinstance(side, Manifest):
        entry = side.entries[name]
        return entry.dtype, list(entry.shape)
    return dtype_name(tensor.dtype), list(tensor.shape)


def compare_tensor(name: str, a: Side, b: Side, sample: float = 1.0, seed: int = 0) -> TensorComparison:
    """Compare one tensor present on both sides (a tensor per side held at a time)."""
    tensor_a = a.tensor(name) if isinstance(a, Checkpoint) else None
    tensor_b = b.tensor(name) if isinstance(b, Checkpoint) else None
    (dtype_a, shape_a), (dtype_b, shape_b) = _entry(a, name, tensor_a), _entry(b, name, tensor_b)
    result = TensorComparison(name, "identical", (dtype_a, dtype_b), (shape_a, shape_b))
    if shape_a != shape_b:
        result.status = "shape differs"
        return result
    if dtype_a != dtype_b:
        result.status = "dtype differs"
    if tensor_a is None or tensor_b is None:  # a manifest side: digests only
        if dtype_a == dtype_b:
            digests = [s.entries[name].sha256 if t is None else tensor_digest(t)
                       for s, t in ((a, tensor_a), (b, tensor_b))]
            result.by_digest = digests[0] != digests[1]
            result.status = "differs" if result.by_digest else "identical"
        return result
    tally = _tally_tensors(name, tensor_a, tensor_b, sample, seed)
    result.elements = tally.elements
    # Over the elements that are numbers on both sides: 0 where all are identical.
    result.max_abs_diff = tally.max_abs_diff or 0.0
    if dtype_a == dtype_b and tensor_a.is_floating_point():
        result.max_ulp = tally.max_ulp or 0
    result.nan_mismatches = tally.nan_mismatches
    if dtype_a == dtype_b:
        result.identical_elements = tally.identical
        result.first_difference = _unravel(tally.first_difference, shape_a)
        if tally.identical < tally.elements:
            result.status = "differs"
    return result


@dataclass
class Comparison:
    """The outcome of `compare`: every tensor name on either side, in natural order."""

    a: str
    b: str
    tensors: List[TensorComparison]
    sample: float = 1.0
    seed: int = 0
    #: Sides that are manifests ("A", "B"): only bit-identity is known for them.
    manifests: List[str] = field(default_factory=list)

    @property
    def differing(self) -> List[TensorComparison]:
        return [t for t in self.tensors if t.status != "identical"]

    @property
    def identical(self) -> bool:
        return not self.differing

    def totals(self) -> Optional[dict]:
        """Over all tensors compared element by element (None where none was)."""
        counted = [t for t in self.tensors if t.identical_elements is not None]
        if not counted:
            return None
        elements = sum(t.elements for t in counted)
        identical = sum(t.identical_elements for t in counted)
        diffs = [t.max_abs_diff for t in counted if t.max_abs_diff is not None]
        ulps = [t.max_ulp for t in counted if t.max_ulp is not None]
        return {
            "elements": elements,
            "identical_elements": identical,
            "identical_fraction": identical / elements if elements else 1.0,
            "max_abs_diff": max(diffs, default=0.0),
            "max_ulp": max(ulps, default=0),
            "nan_mismatches": sum(t.nan_mismatches or 0 for t in counted),
        }

    def notes(self) -> List[str]:
        """What the reader must know to trust the verdict."""
        notes = []
        if self.manifests:
            which = " and ".join(self.manifests) + (" are manifests" if len(self.manifests) > 1
                                                    else " is a manifest")
            notes.append(f"{which}: per tensor only whether it is bit-identical is known "
                         "(SHA-256); identical fraction, max |diff| and ULP are unavailable")
        if self.sample < 1:
            notes.append(f"a sample: {self.sample:g} of each tensor's rows (seed {self.seed}) were "
                         "compared; a difference outside them is not seen, so a sample cannot "
                         "prove the checkpoints bit-identical")
        return notes

    def verdict(self) -> str:
        """'bit-identical (N tensors)' or 'K of N tensors differ: name1, ...'."""
        count, differing = len(self.tensors), self.differing
        sampled = f" in a sample of {self.sample:g} of rows" if self.sample < 1 else ""
        if not differing:
            if self.sample < 1:
                return (f"no difference{sampled} ({count} tensors); "
                        "a sample cannot prove bit-identity")
            return f"bit-identical ({count} tensors)"
        names = ", ".join(t.name for t in differing[:NAMED_IN_VERDICT])
        more = (f", ... (first {NAMED_IN_VERDICT}; all {len(differing)} in --json)"
                if len(differing) > NAMED_IN_VERDICT else "")
        return f"{len(differing)} of {count} tensors differ{sampled}: {names}{more}"

    def to_json(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "bit_identical": self.identical and self.sample >= 1,
            "verdict": self.verdict(),
            "notes": self.notes(),
            "sample": self.sample,
            "seed": self.seed,
            "ulp_definition": "|ord(a) - ord(b)| on the ordered-integer view of the bits; "
                              "-0.0 and +0.0 are 0 ULP apart; NaNs are counted as nan_mismatches",
            "totals": self.totals(),
            "tensors": [t.to_json() for t in self.tensors],
        }


def compare(a: Side, b: Side, sample: float = 1.0, seed: int = 0, progress: bool = True) -> Comparison:
    """Compare every tensor of A and B, one tensor per side in memory at a time.

    sample < 1 compares only a row sample of each tensor (see _element_ranges)."""
    if not 0 < sample <= 1:
        raise InputError(f"--sample must be in (0, 1]; got {sample}")
    manifests = [label for label, side in (("A", a), ("B", b)) if isinstance(side, Manifest)]
    if manifests and sample < 1:
        raise InputError(f"--sample needs two checkpoints: a manifest ({manifests[0]}) holds "
                         "digests of whole tensors, not rows")
    names_a, names_b = set(a.names), set(b.names)
    results: Dict[str, TensorComparison] = {}
    for name in names_a - names_b:
        results[name] = TensorComparison(name, "only in A")
    for name in names_b - names_a:
        results[name] = TensorComparison(name, "only in B")
    # In A's order (its shards one after the other), so each shard is opened once.
    shared = [name for name in a.names if name in names_b]
    for name in tqdm(shared, unit="tensor", desc="comparing", disable=not progress):
        results[name] = compare_tensor(name, a, b, sample, seed)
    ordered = [results[name] for name in sorted(results, key=natural_key)]
    return Comparison(a.spec, b.spec, ordered, sample, seed, manifests)


def iter_report(comparison: Comparison, shown: int = NAMED_IN_VERDICT) -> Iterator[str]:
    """The human report: the differing tensors (the first `shown`), totals, notes
    and, last, the verdict line."""
    differing = comparison.differing
    width = max((len(t.name) for t in differing[:shown]), default=0)
    for tensor in differing[:shown]:
        yield f"{tensor.name:<{width}}  {tensor.detail()}"
    if len(differing) > shown:
        yield f"... and {len(differing) - shown} more differing tensors (all in --json)"
    totals = comparison.totals()
    if totals and totals["identical_elements"] < totals["elements"]:
        line = (f"overall: {100 * totals['identical_fraction']:.4f}% of {totals['elements']:,} "
                f"elements identical, max |diff| {totals['max_abs_diff']:.4g}, "
                f"max {totals['max_ulp']:,} ULP")
        if totals["nan_mismatches"]:
            line += ", " + _nan_mismatches(totals["nan_mismatches"])
        yield line
    for note in comparison.notes():
        yield f"note: {note}"
    yield comparison.verdict()

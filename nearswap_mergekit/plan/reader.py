"""Rows of checkpoint tensors, read the way a sample or a whole pass wants them.

A safetensors tensor is read two ways. Whole (matrix()), it is a view of the file
that safetensors maps, which the kernel reads ahead sequentially: the fastest way
through a whole tensor. Rows picked here and there (read_rows()) are read with
pread at the byte offsets the file's header gives, one call per run of
contiguous rows, after telling the kernel which runs are coming: a mapping would
fault in each touched run with the device's whole readahead window around it
(megabytes for a few kilobytes), so that a 1 % sample of a cold checkpoint would
read most of it. A pickled (.bin) tensor is read whole, lazily, by mergekit's lazy
unpickler on the first read, and let go by release().
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

#: safetensors' dtype names, as torch dtypes (those torch has).
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    **{name: getattr(torch, kind) for name, kind in (
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
    ) if hasattr(torch, kind)},
}


class Holdings:
    """Bytes of tensor data held in memory at once (rows of safetensors files
    excluded: the page cache holds those, or the caller's buffers), and the peak."""

    held = 0
    peak = 0

    @classmethod
    def add(cls, nbytes: int) -> None:
        cls.held += nbytes
        cls.peak = max(cls.peak, cls.held)


class ReadCount:
    """Bytes that read_rows() has asked safetensors files for, by offset, since
    start-up (the device reads them in whole pages)."""

    _lock = threading.Lock()
    bytes_read = 0

    @classmethod
    def add(cls, nbytes: int) -> None:
        with cls._lock:  # the read threads add at once
            cls.bytes_read += nbytes


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's data lies in a safetensors file."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    #: Byte offsets in the file (the header's data_offsets plus the header's size).
    start: int
    end: int


def _identity(path: str) -> tuple:
    """A file as it is now: a file rewritten in place is another file."""
    status = os.stat(path)
    return path, status.st_ino, status.st_size, status.st_mtime_ns


def safetensors_header(path: str) -> Dict[str, TensorSpan]:
    """The tensors of a safetensors file, from its header (read once per file)."""
    return _header(_identity(path))


@functools.lru_cache(maxsize=None)
def _header(identity: tuple) -> Dict[str, TensorSpan]:
    path, size = identity[0], identity[2]
    with open(path, "rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (no header of a valid length)")
        try:
            header = json.loads(file.read(length))
        except ValueError as error:
            raise ValueError(f"{path} is not a safetensors file (its header: {error})") from None
    spans = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which torch cannot read")
        spans[name] = TensorSpan(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                 8 + length + begin, 8 + length + end)
        if spans[name].end > size:
            raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
    return spans


class _OpenFile:
    """One descriptor of a file, shared by the threads that read it."""

    def __init__(self, identity: tuple):
        self.path = identity[0]
        self.file = open(self.path, "rb", buffering=0)
        status = os.fstat(self.file.fileno())
        if (status.st_ino, status.st_size, status.st_mtime_ns) != identity[1:]:
            self.file.close()
            raise ValueError(f"{self.path} changed while it was being read")
        self._lock = threading.Lock()  # only where there is no pread to use

    def read_into(self, offset: int, target: memoryview) -> None:
        """Fill target with the file's bytes from offset on."""
        while len(target):
            if hasattr(os, "preadv"):
                count = os.preadv(self.file.fileno(), [target], offset)
            else:
                with self._lock:
                    self.file.seek(offset)
                    count = self.file.readinto(target)
            if not count:
                raise ValueError(f"{self.path} ends at byte {offset}, inside a tensor's data")
            target, offset = target[count:], offset + count

    def will_need(self, offset: int, length: int) -> None:
        """Tell the kernel a range is coming: the reads of a sample's runs then queue
        at the device together rather than one after another."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.file.fileno(), offset, length, os.POSIX_FADV_WILLNEED)


#: Descriptors kept open; one evicted is closed once no read is using it.
_open_file = functools.lru_cache(maxsize=128)(_OpenFile)


@functools.lru_cache(maxsize=64)
def _mapped_file(path: str):
    """One open safetensors file (its header parsed once); tensors map lazily."""
    from safetensors import safe_open

    return safe_open(path, framework="pt")


@functools.lru_cache(maxsize=None)
def _pickled_shard(path: str):
    """mergekit's lazy unpickler for one .bin shard: it reads the pickle's index
    (names, shapes, offsets) now and each tensor only when asked for it."""
    from mergekit.io.loader import TensorLoader

    return TensorLoader.get(path, use_lazy_unpickle=True)


def _runs(index: torch.Tensor) -> Tuple[list, list]:
    """(first row, row count) of each run of consecutive row numbers in index."""
    breaks = (torch.nonzero(index.diff() != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    counts = [b - a for a, b in zip(starts, [*breaks, len(index)])]
    return index[starts].tolist(), counts


def row_length(shape) -> int:
    """Elements per row as `stats` reads a tensor: all but the first dimension (a
    vector is one row)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


class RowReader:
    """Rows of one tensor of one model: shape, dtype, the whole tensor as (rows,
    row_len), or chosen rows copied out; release() lets go of what it holds."""

    name: Optional[str] = None
    path: Optional[str] = None
    shape: Tuple[int, ...]
    #: Whether rows can be read at any time without holding the tensor (a .bin
    #: tensor is loaded whole: read it, then release it).
    random_access = True
    _tensor: Optional[torch.Tensor] = None
    _held = 0

    def _set_shape(self, shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.rows = self.shape[0] if len(self.shape) >= 2 else 1
        self.row_len = row_length(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix().dtype

    def _load(self) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The whole tensor as (rows, row_len), a view of the file where it can be."""
        if self._tensor is None:
            self._tensor = self._load().reshape(self.rows, self.row_len)
        return self._tensor

    def read_whole(self) -> torch.Tensor:
        """The whole tensor as (rows, row_len), in memory of its own where the file
        allows (see SafetensorsRows.read_whole)."""
        return self.matrix()

    def read_rows(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """out[i] = row index[i], converted to out's dtype."""
        source = self.matrix()
        if source.dtype == out.dtype:
            torch.index_select(source, 0, index, out=out)
        else:
            out.copy_(source.index_select(0, index))

    def release(self) -> None:
        """Let go of the tensor (read again on the next read)."""
        self._tensor = None
        Holdings.add(-self._held)
        self._held = 0


class SafetensorsRows(RowReader):
    """A tensor of a safetensors file: mapped whole, or chosen rows read by offset."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self._file = _identity(path)
        self.span = _header(self._file)[name]
        self._set_shape(self.span.shape)
        self.row_bytes = self.row_len * self.span.dtype.itemsize

    @property
    def dtype(self) -> torch.dtype:
        return self.span.dtype  # from the header: nothing is read

    def _load(self) -> torch.Tensor:
        return _mapped_file(self.path).get_tensor(self.name)

    def release(self) -> None:
        self._tensor = None  # a view of the mapping: nothing held

    def read_whole(self) -> torch.Tensor:
        """The tensor's bytes read (pread) into a new tensor, not mapped. A reader
        that goes through a file once and holds each tensor while it computes (the
        ladder) leaves only unmapped page cache behind, which a memory limit reclaims
        first; its mapped pages were reclaimed and read again: under a 2 GiB cgroup
        with 3 GB of inputs, 21x the inputs read per pass and killed for memory,
        against 1.0x by pread."""
        out = torch.empty((self.rows, self.row_len), dtype=self.dtype)
        if out.numel():
            _open_file(self._file).read_into(self.span.start, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def read_rows(self, index: torch.Tensor, out: torch.Tensor) -> None:
        """out[i] = row index[i]: one pread per run of consecutive rows, straight into
        out where the dtypes agree; only the rows' own bytes are asked for."""
        direct = out.dtype == self.dtype and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=self.dtype)
        if len(index):
            firsts, counts = _runs(index)
            file = _open_file(self._file)
            offsets = [self.span.start + first * self.row_bytes for first in firsts]
            if len(firsts) > 1:
                for offset, count in zip(offsets, counts):
                    file.will_need(offset, count * self.row_bytes)
            buffer = memoryview(target.view(torch.uint8).numpy()).cast("B")
            position = 0
            for offset, count in zip(offsets, counts):
                length = count * self.row_bytes
                file.read_into(offset, buffer[position : position + length])
                position += length
            ReadCount.add(position)
        if target is not out:
            out.copy_(target)


class PickledRows(RowReader):
    """A tensor of a pickled (.bin) shard: loaded whole on the first read."""

    random_access = False

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self._set_shape(_pickled_shard(path).index[name].shape)

    def _load(self) -> torch.Tensor:
        tensor = _pickled_shard(self.path).get_tensor(self.name)
        self._held = tensor.numel() * tensor.element_size()
        Holdings.add(self._held)
        return tensor


class TensorRows(RowReader):
    """Rows of a tensor already in memory (one aligned by mergekit's vocabulary task)."""

    def __init__(self, tensor: torch.Tensor):
        self._set_shape(tensor.shape)
        self._tensor = tensor.reshape(self.rows, self.row_len)
        self._held = tensor.numel() * tensor.element_size()
        Holdings.add(self._held)

    def release(self) -> None:
        """Stop counting the tensor as held (whoever made this reader drops it)."""
        Holdings.add(-self._held)
        self._held = 0


def find_rows(model, names: Sequence[str]) -> Optional[RowReader]:
    """The reader of the first of `names` that `model` has, found through mergekit's
    loader index (shards, aliases, tied names); None where it has none of them."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    name = next((n for n in names if n in index.tensor_paths), None)
    if name is None:
        return None
    path = index.tensor_paths[name]
    path = path if os.path.isabs(path) else os.path.join(index.base_path, path)
    return SafetensorsRows(path, name) if index.is_safetensors else PickledRows(path, name)

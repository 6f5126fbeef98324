"""Optional compiled path: _fused.c built with the system C compiler on first use.

It computes the whole chain in one pass over memory and gives the same bits as
the pure-torch path, which remains the fallback (no compiler, a non-x86 machine,
strided or float64 inputs, accelerators, or NEARSWAP_MERGEKIT_KERNEL=torch).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

import torch

log = logging.getLogger("nearswap_mergekit")

SOURCE = Path(__file__).with_name("_fused.c")
BACKEND_VARIABLE = "NEARSWAP_MERGEKIT_KERNEL"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd", "-shared", "-fPIC"]
#: Below this many elements one thread does the work.
PARALLEL_MIN = 1 << 18

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False
_pool: Optional[ThreadPoolExecutor] = None


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nearswap_mergekit"


def _build() -> Optional[ctypes.CDLL]:
    if platform.machine() not in ("x86_64", "AMD64") or "f16c" not in _cpu_flags():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode() + compiler.encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"fused-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run(
                [compiler, *FLAGS, "-o", str(built), str(SOURCE)],
                check=True,
                capture_output=True,
            )
            os.replace(built, target)  # atomic: concurrent builders are harmless
    library = ctypes.CDLL(str(target))
    # Both entry points start (base, secondaries, t, stages, dtype, round_stages).
    chain = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float),
             ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.nearswap_chain_range.restype = None
    library.nearswap_chain_range.argtypes = [*chain, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    library.nearswap_chain_rows.restype = None
    library.nearswap_chain_rows.argtypes = [*chain, ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 5]
    return library


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot be built (logged once)."""
    global _library, _tried
    if os.environ.get(BACKEND_VARIABLE, "auto") == "torch":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _library = _build()
            except Exception as error:  # no compiler, read-only cache, ...
                detail = getattr(error, "stderr", b"") or b""
                log.info(
                    "NearSwap: compiled kernel unavailable (%s %s); using the torch path",
                    error,
                    detail.decode(errors="replace")[-500:],
                )
    return _library


def supports(tensors: Sequence[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(
        t.device.type == "cpu"
        and t.dtype == first.dtype
        and t.is_contiguous()
        and not t.requires_grad
        for t in tensors
    ) and first.dtype in DTYPE_CODES


def run(
    base: torch.Tensor,
    secondaries: List[torch.Tensor],
    thresholds: List[float],
    round_stages: bool,
    out: torch.Tensor,
) -> bool:
    """Fill `out` with the chain; False (nothing written) where this path does not apply."""
    if not supports([base, *secondaries, out]):
        return False
    lib = library()
    if lib is None:
        return False
    pointers = (ctypes.c_void_p * len(secondaries))(*(s.data_ptr() for s in secondaries))
    ts = (ctypes.c_float * len(thresholds))(*thresholds)
    args = (base.data_ptr(), pointers, ts, len(secondaries), DTYPE_CODES[base.dtype],
            int(round_stages), out.data_ptr())
    _in_parallel(lambda start, stop: lib.nearswap_chain_range(*args, start, stop), out.numel(), 1024)
    return True


def _in_parallel(work, n: int, grain: int, cost_per_item: int = 1) -> None:
    """Run work(start, stop) over [0, n) in up to torch.get_num_threads() threads;
    ctypes releases the GIL, so the C loops run in parallel. Splits are multiples of grain."""
    workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, n * cost_per_item // PARALLEL_MIN))
    if workers == 1:
        work(0, n)
        return
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="nearswap")
    step = -(-n // workers)
    step += -step % grain
    futures = [_pool.submit(work, start, min(start + step, n)) for start in range(0, n, step)]
    for future in futures:
        future.result()


def chain_rows(
    base: torch.Tensor,
    secondaries: List[torch.Tensor],
    thresholds: List[float],
    round_stages: bool,
    stats: List[torch.Tensor],
) -> bool:
    """The chain over rows with per-row statistics (see _fused.c) into stats, five
    (stages, rows) tensors; False where this path does not apply."""
    if not supports([base, *secondaries]):
        return False
    lib = library()
    if lib is None:
        return False
    rows = base.shape[0]
    row_len = base.numel() // max(rows, 1)
    size = base.element_size()
    ts = (ctypes.c_float * len(thresholds))(*thresholds)

    def work(start: int, stop: int) -> None:
        pointers = (ctypes.c_void_p * len(secondaries))(
            *(s.data_ptr() + start * row_len * size for s in secondaries)
        )
        parts = [s[:, start:stop].contiguous() for s in stats]
        lib.nearswap_chain_rows(
            base.data_ptr() + start * row_len * size, pointers, ts, len(secondaries),
            DTYPE_CODES[base.dtype], int(round_stages), stop - start, row_len,
            *(p.data_ptr() for p in parts),
        )
        for whole, part in zip(stats, parts):
            whole[:, start:stop] = part

    _in_parallel(work, rows, 1, cost_per_item=row_len * len(secondaries))
    return True

"""Optional compiled path: _fused.c built with the system C compiler on first use.

It computes the whole chain in one pass over memory and gives the same bits as
the pure-torch path, which remains the fallback (strided or float64 inputs,
accelerators, no working C compiler, or NEARSWAP_MERGEKIT_KERNEL=torch).

The compiler is $CC (a command such as ``clang`` or ``gcc-11``), else the first of
cc, gcc and clang found. Architecture flags are probed in order: -march=native,
-mcpu=native (the Arm spelling), none; NEARSWAP_MERGEKIT_CFLAGS replaces them
(``-march=x86-64``, for example, builds without F16C). The library is cached
under $XDG_CACHE_HOME/nearswap_mergekit (default ~/.cache/nearswap_mergekit),
keyed by the source, the compiler, the flags and the compiler's predefined macros
under those flags, which name the target's instruction-set features: a home
folder shared between machines never loads another CPU's build.

Where the fused path cannot be built, one warning per process says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("nearswap_mergekit")

SOURCE = Path(__file__).with_name("_fused.c")
BACKEND_VARIABLE = "NEARSWAP_MERGEKIT_KERNEL"
CFLAGS_VARIABLE = "NEARSWAP_MERGEKIT_CFLAGS"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Besides the architecture flags. -ffp-contract=off: no FMA (it rounds once where
#: the torch path rounds twice). -fno-trapping-math, clang's default, lets GCC < 12
#: turn the NaN selects into blends so that the loops vectorize; no value changes.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
#: Architecture flags, best first; -mcpu=native is the Arm spelling (Apple clang).
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
#: -fopenmp-simd only enables `#pragma omp simd`; dropped where a compiler refuses it.
OPENMP_FLAG = "-fopenmp-simd"
COMPILERS = ("cc", "gcc", "clang")
#: How much slower the torch path is on the CPU (README, Performance).
SLOWDOWN = "about 4x"
#: Below this many elements one thread does the work.
PARALLEL_MIN = 1 << 18

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_info: Optional[Dict[str, object]] = None
_tried = False
_pool: Optional[ThreadPoolExecutor] = None


class Unavailable(Exception):
    """The fused kernel cannot be built here; the message says why."""


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "nearswap_mergekit"


def _tail(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _run(command: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(command), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )


def compiler_command() -> List[str]:
    """$CC split into words (it may carry flags), else the first compiler found."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        words = shlex.split(chosen)
        path = shutil.which(words[0])
        if path is None:
            raise Unavailable(f"CC={chosen!r} is not a command that can be run")
        return [path, *words[1:]]
    for name in COMPILERS:
        path = shutil.which(name)
        if path is not None:
            return [path]
    raise Unavailable(f"no C compiler found (CC is unset; tried {', '.join(COMPILERS)})")


def _probe(compiler: List[str], arch: List[str]) -> Tuple[List[str], str]:
    """The compile flags with `arch` and the compiler's predefined macros under them
    (preprocessing an empty file is the cheap probe); -fopenmp-simd only if accepted."""
    for openmp in ([OPENMP_FLAG], []):
        flags = [*arch, *FLAGS, *openmp, "-fPIC"]
        probe = _run([*compiler, *flags, "-dM", "-E", "-x", "c", os.devnull], timeout=60)
        if probe.returncode == 0:
            return flags, probe.stdout
    raise Unavailable(f"{' '.join(flags)}: {_tail(probe.stderr, 300)}")


def cache_key(source: bytes, compiler: Sequence[str], version: str, flags: Sequence[str],
              macros: str) -> str:
    """Names one build: same inputs, same key; another target (macros) or compiler, another key."""
    digest = hashlib.sha256()
    for part in (source, "\0".join(compiler).encode(), version.encode(),
                 "\0".join(flags).encode(), macros.encode()):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:20]


def _build() -> Tuple[ctypes.CDLL, Dict[str, object]]:
    compiler = compiler_command()
    try:
        version = _run([*compiler, "--version"], timeout=60)
    except OSError as error:
        raise Unavailable(f"{compiler[0]} cannot be run: {error}") from None
    override = os.environ.get(CFLAGS_VARIABLE)
    arches = [shlex.split(override)] if override is not None else ARCH_FLAGS
    source = SOURCE.read_bytes()
    failures = []
    for arch in arches:
        try:
            flags, macros = _probe(compiler, arch)
        except Unavailable as error:
            failures.append(str(error))
            continue
        key = cache_key(source, compiler, version.stdout + version.stderr, flags, macros)
        target = _cache_dir() / f"fused-{key}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                    built = Path(scratch) / target.name
                    result = _run([*compiler, *flags, "-shared", "-o", str(built), str(SOURCE)])
                    if result.returncode != 0:
                        failures.append(f"{' '.join(flags)}: {_tail(result.stderr)}")
                        continue
                    os.replace(built, target)  # atomic: concurrent builders are harmless
            except OSError as error:
                raise Unavailable(f"cannot write the build cache {target.parent}: {error}") from None
        info = {"compiler": compiler, "version": version.stdout.partition("\n")[0],
                "flags": flags, "macros": macros, "path": str(target)}
        return ctypes.CDLL(str(target)), info
    raise Unavailable(f"{compiler[0]} could not build {SOURCE.name}: {'; '.join(failures)}")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    # Both entry points start (base, secondaries, t, stages, dtype, round_stages).
    chain = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float),
             ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.nearswap_chain_range.restype = None
    library.nearswap_chain_range.argtypes = [*chain, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    library.nearswap_chain_rows.restype = None
    library.nearswap_chain_rows.argtypes = [*chain, ctypes.c_int64, ctypes.c_int64, *[ctypes.c_void_p] * 5]
    return library


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot be built (a warning, once) or
    NEARSWAP_MERGEKIT_KERNEL=torch asks for the torch path."""
    global _library, _info, _tried
    if os.environ.get(BACKEND_VARIABLE, "auto") == "torch":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                built, _info = _build()
                _library = _declare(built)
            except Exception as error:  # no compiler, compile error, read-only cache, ...
                log.warning(
                    "NearSwap: the fused C kernel is unavailable (%s); using the torch path, "
                    "%s slower on the CPU. To fix: install gcc >= 9 or clang >= 14, or set CC "
                    "to one; %s=torch chooses the torch path on purpose and silences this.",
                    error, SLOWDOWN, BACKEND_VARIABLE,
                )
    return _library


def fused_available() -> bool:
    """Whether the fused kernel is built and loaded in this process (builds it on first call)."""
    return library() is not None


def build_info() -> Optional[Dict[str, object]]:
    """How the loaded kernel was built (compiler, version, flags, macros, path), or None."""
    return _info if library() is not None else None


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
    # The caller's inference mode goes with the work: a worker thread starts outside
    # it, and writing into a tensor made inside it would raise there.
    inference = torch.is_inference_mode_enabled()

    def run(start: int, stop: int) -> None:
        with torch.inference_mode(inference):
            work(start, stop)

    futures = [_pool.submit(run, start, min(start + step, n)) for start in range(0, n, step)]
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

"""Optional GPU path: the whole chain as one Triton kernel (_triton_kernel.py).

It applies to CUDA tensors of float32, float16 and bfloat16 (mixed too), where
Triton is installed; it gives the torch path's bits (NaN bit patterns aside: a
NaN that the GPU's arithmetic makes is CUDA's default NaN). The torch path is
the fallback for float64, for a missing Triton, and where
NEARSWAP_MERGEKIT_KERNEL=torch asks for it. Where Triton is missing or fails to
compile the kernel, one warning per process says why and how to fix it.

Contiguous inputs are read in place, one launch for the whole tensor. Strided
inputs are copied, a piece at a time, into buffers that together hold at most
as many bytes as the output, and the kernel runs on each piece.

Triton is imported on first use, not when the package is imported. With
TRITON_INTERPRET=1 set, backend="triton" also runs on CPU tensors through
Triton's interpreter (numpy's float32 arithmetic: the tests check the kernel's
logic with it; only a GPU shows the GPU's bits).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("nearswap_mergekit")

BACKEND_VARIABLE = "NEARSWAP_MERGEKIT_KERNEL"
INTERPRET_VARIABLE = "TRITON_INTERPRET"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The Triton that the `gpu` extra pins (the one torch 2.13.0's CUDA build requires).
TRITON_PIN = "triton==3.7.1"

_lock = threading.Lock()
_module = None
_tried = False
_failed = False
#: Kernel launches in this process (the tests read it to see that the kernel ran).
launches = 0


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (as Triton reads it)."""
    return os.environ.get(INTERPRET_VARIABLE, "0").strip().lower() in ("1", "true", "on", "yes")


def _warn(reason: str) -> None:
    log.warning(
        "NearSwap: the Triton kernel is unavailable (%s); using the torch path, which is "
        "slower on the GPU (same bits). To fix: pip install %s (or nearswap-mergekit[gpu]); "
        "%s=torch chooses the torch path on purpose and silences this.",
        reason, TRITON_PIN, BACKEND_VARIABLE,
    )


def kernel_module():
    """_triton_kernel, imported once; None (after one warning) where Triton is missing,
    or where the kernel failed to compile or run earlier in this process."""
    global _module, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _module = importlib.import_module("nearswap_mergekit.method._triton_kernel")
            except ImportError as error:
                _warn(f"Triton is not installed: {error}")
            except Exception as error:  # a broken Triton install
                _warn(f"Triton could not be imported: {type(error).__name__}: {error}")
    return None if _failed else _module


def supports(tensors: Sequence[torch.Tensor], allow_interpreter: bool) -> bool:
    """Whether the kernel applies to these tensors (inputs and output)."""
    device = tensors[0].device.type
    if device == "cpu":
        if not (allow_interpreter and interpreting()):
            return False
    elif device != "cuda":
        return False
    return all(t.dtype in DTYPES and t.device == tensors[0].device for t in tensors)


def available(allow_interpreter: bool = False) -> bool:
    """Whether the Triton path can run here (imports Triton on first call)."""
    if os.environ.get(BACKEND_VARIABLE, "auto") == "torch":
        return False
    if not (torch.cuda.is_available() or (allow_interpreter and interpreting())):
        return False
    return kernel_module() is not None


def pieces(shape: Tuple[int, ...], budget: int) -> Iterator[tuple]:
    """Index tuples that cut a tensor of `shape` into pieces of at most `budget`
    elements (budget >= 1), each a contiguous run of a contiguous tensor: a slice of
    rows of the leading dimension, or, where one row is too large, a row's pieces."""
    if math.prod(shape) <= budget or not shape:
        yield ()
        return
    row = math.prod(shape[1:])
    if row <= budget:
        step = budget // row
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])),)
        return
    for index in range(shape[0]):
        for rest in pieces(shape[1:], budget):
            yield (index, *rest)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as the kernel reads it: flat, bfloat16 as int16 bits."""
    flat = tensor.reshape(-1)
    return flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat


def run(
    base: torch.Tensor,
    secondaries: List[torch.Tensor],
    thresholds: List[float],
    round_stages: bool,
    out: torch.Tensor,
    allow_interpreter: bool = False,
) -> bool:
    """Fill `out` with the chain; False (nothing trusted in `out`) where this path
    does not apply or cannot run. `allow_interpreter`: CPU tensors run through
    Triton's interpreter where TRITON_INTERPRET=1 is set."""
    global _failed
    if os.environ.get(BACKEND_VARIABLE, "auto") == "torch":
        return False
    inputs = [base, *secondaries]
    if not supports([*inputs, out], allow_interpreter):
        return False
    module = kernel_module()
    if module is None:
        return False
    kernel = module.interpreted if out.device.type == "cpu" else module.compiled
    rounds = round_stages and out.dtype != torch.float32
    try:
        _run_pieces(module, kernel, inputs, thresholds, rounds, out)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # no C compiler for Triton's launcher, a ptxas failure, ...
        with _lock:
            first, _failed = not _failed, True
        if first:
            _warn(f"it failed to compile or run: {type(error).__name__}: {error}")
        return False
    return True


def _run_pieces(module, kernel, inputs, thresholds, rounds, out) -> None:
    global launches
    device = out.device
    views = [x.reshape(1) if x.ndim == 0 else x for x in (*inputs, out)]
    inputs, target = views[:-1], views[-1]
    t = torch.tensor(thresholds, dtype=torch.float32).to(device)  # as the CPU rounds each t
    strided = [k for k, x in enumerate(inputs) if not x.is_contiguous()]
    budget = target.numel()
    if strided:
        per_element = sum(inputs[k].element_size() for k in strided)
        budget = max(1, target.numel() * target.element_size() // per_element)
    buffers = {k: torch.empty(min(budget, target.numel()), dtype=inputs[k].dtype, device=device)
               for k in strided}
    context = torch.cuda.device(device) if device.type == "cuda" else _numpy_quiet()
    with context:
        for index in pieces(tuple(target.shape), budget):
            piece_out = target[index]
            flats = []
            for k, x in enumerate(inputs):
                piece = x[index]
                if k in buffers:
                    buffer = buffers[k][: piece.numel()].view(piece.shape)
                    buffer.copy_(piece)
                    piece = buffer
                flats.append(_flat(piece))
            module.launch(kernel, flats, t, _flat(piece_out), rounds)
            launches += 1


class _numpy_quiet:
    """Triton's interpreter computes with numpy, which warns about 0/0 and t/0."""

    def __enter__(self):
        import numpy

        self.saved = numpy.seterr(all="ignore")

    def __exit__(self, *exc):
        import numpy

        numpy.seterr(**self.saved)


def reset() -> None:
    """Forget the import, the failure and the warning (tests)."""
    global _module, _tried, _failed
    with _lock:
        _module, _tried, _failed = None, False, False


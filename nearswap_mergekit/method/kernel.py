"""NearSwap and its sequential chain as pure-torch kernels; no mergekit import.

Per stage, with base v0, secondary v1 and threshold t (the QuartetAnemoi card)::

    w = t / |v0 - v1|;  NaN, +inf, -inf -> 1;  clip w to [0, 1];  out = (1 - w) * v0 + w * v1

Arithmetic is float32 (float64 when the inputs are float64) and bit-identical to
that formula evaluated in numpy. Work is done in blocks with preallocated buffers,
so the extra memory beyond the output is O(block_size) however large the tensors.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from nearswap_mergekit.method import _fused, _triton
from nearswap_mergekit.method.spec import check_threshold

#: Elements per block on the CPU: small enough to stay in L2 cache, large enough
#: to amortise per-op dispatch. Any value gives the same bits.
CPU_BLOCK_SIZE = 1 << 16
#: On accelerators, kernel launches dominate small blocks.
ACCELERATOR_BLOCK_SIZE = 1 << 24

Threshold = Union[float, Sequence[float]]
BACKENDS = ("auto", "fused", "triton", "torch")
NOT_APPLICABLE = {
    "fused": "the fused kernel does not apply here (it needs a C compiler and contiguous "
    "CPU float32/float16/bfloat16 inputs of one dtype)",
    "triton": "the Triton kernel does not apply here (it needs Triton and CUDA "
    "float32/float16/bfloat16 inputs, or CPU tensors with TRITON_INTERPRET=1 set; "
    f"{_fused.BACKEND_VARIABLE}=torch turns it off)",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype NearSwap computes in for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearswap_chain(
    base: torch.Tensor,
    secondaries: Sequence[torch.Tensor],
    t: Threshold,
    *,
    round_stages: bool = True,
    block_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Apply NearSwap stages in order: r0 = base, r_k = NearSwap(t_k, r_(k-1), secondaries[k-1]).

    Args:
        base: the base model's tensor (v0 of the first stage).
        secondaries: one tensor per stage, same shape and device as `base`.
        t: one threshold for every stage, or one per secondary; each finite and >= 0.
        round_stages: round each stage's result to the inputs' dtype, as a staged
            merge saving its intermediates in that dtype would; False carries the
            compute dtype between stages.
        block_size: elements per block of the torch path (None picks one for
            the device); never changes the result.
        backend: "torch" (blocked torch ops), "fused" (the compiled one-pass
            C loop: contiguous CPU float32/float16/bfloat16 inputs of one dtype),
            "triton" (one Triton kernel: CUDA float32/float16/bfloat16 inputs,
            mixed or strided too; CPU tensors through Triton's interpreter where
            TRITON_INTERPRET=1 is set), or "auto": fused on the CPU and triton on
            CUDA where they apply, else torch. All give the same bits (NaN bit
            patterns aside on a GPU). NEARSWAP_MERGEKIT_KERNEL=torch makes
            "auto" choose torch.

    Returns:
        A new contiguous tensor in the inputs' (promoted) dtype. Inputs are not modified.
    """
    secondaries = list(secondaries)
    if not secondaries:
        raise ValueError("nearswap_chain needs at least one secondary tensor")
    if getattr(t, "ndim", None) == 0:  # a 0-d numpy array or torch tensor
        t = t.item()
    if isinstance(t, (numbers.Real, str, bytes)) or not hasattr(t, "__iter__"):
        thresholds = [check_threshold(t)] * len(secondaries)  # numpy scalars are numbers.Real
    else:
        thresholds = [check_threshold(value, f"t[{i}]") for i, value in enumerate(t)]
        if len(thresholds) != len(secondaries):
            raise ValueError(
                f"t has {len(thresholds)} values but there are {len(secondaries)} "
                "secondaries; give one t per secondary, or a single number"
            )
    tensors = [base, *secondaries]
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = "base" if index == 0 else f"secondaries[{index - 1}]"
            raise TypeError(f"{what} must be a floating-point torch.Tensor")
        if tensor.shape != base.shape:
            raise ValueError(
                f"shape mismatch: base is {tuple(base.shape)}, "
                f"secondaries[{index - 1}] is {tuple(tensor.shape)}"
            )
        if tensor.device != base.device:
            raise ValueError(
                f"device mismatch: base is on {base.device}, "
                f"secondaries[{index - 1}] is on {tensor.device}"
            )

    # The merge is not differentiable: nn.Parameter and requires_grad inputs are
    # read as plain tensors (detach shares their memory), and the output has no graph.
    base, secondaries = base.detach(), [tensor.detach() for tensor in secondaries]
    tensors = [base, *secondaries]
    with torch.no_grad():
        return _chain(base, secondaries, tensors, thresholds, round_stages, block_size, backend)


def _chain(base, secondaries, tensors, thresholds, round_stages, block_size, backend):
    """nearswap_chain on checked, detached inputs."""
    io_dtype = base.dtype
    for tensor in secondaries:
        io_dtype = torch.promote_types(io_dtype, tensor.dtype)
    work_dtype = compute_dtype(io_dtype)
    rounds = round_stages and io_dtype != work_dtype
    device = base.device
    if block_size is None:
        block_size = CPU_BLOCK_SIZE if device.type == "cpu" else ACCELERATOR_BLOCK_SIZE
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    out = torch.empty(base.shape, dtype=io_dtype, device=device)
    if out.numel() == 0:
        return out
    if backend in ("auto", "fused") and _fused.run(base, secondaries, thresholds, round_stages, out):
        return out
    if backend in ("auto", "triton") and _triton.run(
        base, secondaries, thresholds, round_stages, out, allow_interpreter=backend == "triton"
    ):
        return out
    if backend != "auto" and backend != "torch":
        raise RuntimeError(NOT_APPLICABLE[backend] + "; use backend='auto'")
    # Blocks are whole rows of the leading dimension, so strided inputs are read
    # block by block (copy_ handles strides and the dtype cast into the buffer).
    views = [x.reshape(1) if x.ndim == 0 else x for x in (*tensors, out)]
    leading, row_shape = views[0].shape[0], views[0].shape[1:]
    row_numel = math.prod(row_shape)
    rows_per_block = max(1, block_size // row_numel)
    buffer_numel = min(leading, rows_per_block) * row_numel

    def buffer(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(buffer_numel, dtype=dtype, device=device)

    acc, other, diff, weight = (buffer(work_dtype) for _ in range(4))
    low = buffer(io_dtype) if rounds else None
    t_values = [torch.tensor(t_k, dtype=work_dtype, device=device) for t_k in thresholds]
    one = torch.ones((), dtype=work_dtype, device=device)

    for start in range(0, leading, rows_per_block):
        stop = min(start + rows_per_block, leading)
        shape = (stop - start, *row_shape)
        n = math.prod(shape)
        a, b, d, w = (x[:n] for x in (acc, other, diff, weight))
        _widen(a.view(shape), views[0][start:stop])
        for secondary, t_k in zip(views[1:-1], t_values):
            _widen(b.view(shape), secondary[start:stop])
            _stage(a, b, t_k, one, d, w)
            if rounds:
                low[:n].copy_(a)
                _widen(a, low[:n])
        views[-1][start:stop].copy_(a.view(shape))
    return out


def _widen(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src), keeping float16 NaN payloads as the hardware conversion does.

    torch's CPU float16 -> float32 copy gives NaNs in the scalar tail of its loop
    the bits 0x7fffffff, so a NaN's payload would depend on its position.
    """
    dst.copy_(src)
    if src.dtype == torch.float16 and src.device.type == "cpu":
        nan = torch.isnan(src)
        if nan.any():
            half = src[nan].view(torch.int16).to(torch.int32) & 0xFFFF
            single = ((half & 0x8000) << 16) | 0x7FC00000 | ((half & 0x3FF) << 13)
            dst[nan] = single.view(torch.float32).to(dst.dtype)


def _stage(
    a: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    one: torch.Tensor,
    d: torch.Tensor,
    w: torch.Tensor,
) -> None:
    """a <- NearSwap(t, a, b) in place; b, d, w are scratch. One op per formula step."""
    torch.sub(a, b, out=d)
    d.abs_()
    # torch.div, not `t / d`: Tensor.__rtruediv__ multiplies by a reciprocal,
    # which is not bit-identical to a division.
    torch.div(t, d, out=w)
    w.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)
    w.clamp_(0.0, 1.0)
    torch.mul(w, b, out=b)  # w * v1
    torch.sub(one, w, out=d)  # 1 - w
    a.mul_(d)  # (1 - w) * v0
    torch.add(b, a, out=a)


def nearswap(
    v0: torch.Tensor,
    v1: torch.Tensor,
    t: float,
    *,
    block_size: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One NearSwap stage: move v0 toward v1 by at most t; swap where |v0 - v1| <= t."""
    return nearswap_chain(v0, [v1], t, block_size=block_size, backend=backend)


def chain_with_row_stats(
    base: torch.Tensor,
    secondaries: Sequence[torch.Tensor],
    t: Sequence[float],
    *,
    round_stages: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, ...]:
    """The chain over a block of rows, with the statistics of each row at each stage.

    Args:
        base, secondaries: rows of shape (rows, row_len), contiguous, all in the
            dtype the merge computes from.
        t: one threshold per secondary.

    Returns:
        Five (stages, rows) tensors: elements with v0 == v1; elements fully
        swapped (w == 1, equal ones included); elements moved (result != v0,
        finite shift); the sum of those moved elements' |shift| (float64); and
        elements where v0 or v1 is NaN or infinite.
    """
    thresholds = [check_threshold(value, f"t[{i}]") for i, value in enumerate(t)]
    shape = (len(secondaries), base.shape[0])
    stats = [torch.zeros(shape, dtype=torch.int64) for _ in range(3)]
    stats.append(torch.zeros(shape, dtype=torch.float64))
    stats.append(torch.zeros(shape, dtype=torch.int64))
    if backend != "torch" and _fused.chain_rows(base, list(secondaries), thresholds, round_stages, stats):
        return tuple(stats)
    work = compute_dtype(base.dtype)
    a = base.to(work)
    one = torch.ones((), dtype=work)
    for k, (secondary, t_k) in enumerate(zip(secondaries, thresholds)):
        v1 = secondary.to(work)
        result, weight, scratch = a.clone(), torch.empty_like(a), torch.empty_like(a)
        _stage(result.view(-1), v1.clone().view(-1), torch.tensor(t_k, dtype=work), one,
               scratch.view(-1), weight.view(-1))
        if round_stages and base.dtype != work:
            result = result.to(base.dtype).to(work)
        shift = (result - a).abs_()
        moved = (result != a) & (shift <= torch.finfo(work).max)
        stats[0][k] = (a == v1).sum(1)
        stats[1][k] = (weight == 1).sum(1)
        stats[2][k] = moved.sum(1)
        stats[3][k] = torch.where(moved, shift, 0).to(torch.float64).sum(1)
        stats[4][k] = (~(torch.isfinite(a) & torch.isfinite(v1))).sum(1)
        a = result
    return tuple(stats)

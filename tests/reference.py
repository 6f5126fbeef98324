"""An independent NearSwap reference: the QuartetAnemoi card's numpy code, verbatim in spirit.

Computes in float32 (float64 for float64 inputs) with numpy; rounds between
stages through numpy (float16) or torch (bfloat16, which numpy lacks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def card_nearswap(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """The card's code: absolute, divide, nan_to_num, clip, lerp."""
    shape = np.shape(v0)
    v0, v1 = np.reshape(v0, -1), np.reshape(v1, -1)  # 0-d would decay to scalars
    with np.errstate(all="ignore"):
        lweight = np.absolute(v0 - v1)
        lweight = t / lweight
        lweight = np.nan_to_num(lweight, nan=1.0, posinf=1.0, neginf=1.0)
        np.clip(lweight, a_min=0.0, a_max=1.0, out=lweight)
        return ((1 - lweight) * v0 + lweight * v1).reshape(shape)


def _to_numpy(x: torch.Tensor, dtype) -> np.ndarray:
    x = x.detach().cpu()
    if x.dtype == torch.float16:  # numpy's own conversion keeps NaN payloads
        return x.view(torch.int16).numpy().view(np.float16).astype(dtype)
    return x.to(torch.float64 if dtype == np.float64 else torch.float32).numpy()


def _round(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float16:
        return x.astype(np.float16).astype(np.float32)
    if dtype == torch.bfloat16:
        return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    return x


def reference_chain(
    base: torch.Tensor,
    secondaries: Sequence[torch.Tensor],
    ts: Sequence[float],
    round_stages: bool = True,
) -> torch.Tensor:
    io_dtype = base.dtype
    for s in secondaries:
        io_dtype = torch.promote_types(io_dtype, s.dtype)
    work = np.float64 if io_dtype == torch.float64 else np.float32
    result = _to_numpy(base, work)
    for secondary, t in zip(secondaries, ts):
        result = card_nearswap(t, result, _to_numpy(secondary, work))
        if round_stages:
            result = _round(result, io_dtype)
    return torch.from_numpy(np.array(result, order="C")).to(io_dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN payloads and signed zeros included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))

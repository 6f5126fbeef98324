"""The NearSwap chain as one Triton kernel: every stage in registers, one read of
each input, one write of the output. Imported only where the Triton path runs
(it imports triton).

It gives the torch path's bits (kernel.py `_stage`) because every step is the
same IEEE float32 operation, in the same order, with the same operands first:

- division is `tl.div_rn` (correctly rounded), never `/`, which compiles to an
  approximate division on NVIDIA GPUs;
- the launch passes enable_fp_fusion=False: no multiply-add becomes an FMA
  (one rounding where torch rounds twice);
- NaN and infinities are tested explicitly (`w != w`, `|w| == inf`), then w is
  clamped with comparisons and selects, as nan_to_num then clamp do;
  tl.maximum and tl.minimum would drop a NaN;
- float32 arithmetic keeps subnormals (no `.ftz` in the PTX: tests/test_triton.py
  reads it), and enable_reflect_ftz=False keeps libdevice from flushing too;
- float16 and bfloat16 are widened and rounded as the CPU does: bfloat16 with
  integer operations (round to nearest even, NaN -> 0xFFFF as torch's CPU
  conversion), float16 with the hardware's round to nearest even and, for NaNs,
  the payload kept as F16C keeps it.

The inputs' element types say how to read them: float32, float16, or int16
(bfloat16 bits, passed as an int16 view, so that neither the compiler nor
Triton's interpreter converts them).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

#: Elements per program; 16 float16 values per thread with 4 warps.
BLOCK = 2048
#: Elements per program in Triton's interpreter, where each program costs Python
#: overhead: larger blocks, still several per tensor in the tests.
INTERPRETER_BLOCK = 1 << 14
NUM_WARPS = 4
#: Launch options: the IEEE points above that are compiler options.
OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def chain_kernel(inputs, t_ptr, out_ptr, n, STAGES: tl.constexpr, ROUND: tl.constexpr,
                 BLOCK: tl.constexpr):
    """out = the chain over inputs = (base, secondary 1, ..., secondary STAGES)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    OUT_F16: tl.constexpr = out_ptr.dtype.element_ty == tl.float16
    OUT_BF16: tl.constexpr = out_ptr.dtype.element_ty == tl.int16
    for k in tl.static_range(STAGES + 1):
        ptr = inputs[k]
        # Widen to float32 exactly.
        if ptr.dtype.element_ty == tl.float32:
            x = tl.load(ptr + offsets, mask=mask, other=0.0)
        elif ptr.dtype.element_ty == tl.float16:
            h = tl.load(ptr + offsets, mask=mask, other=0.0)
            hb = h.to(tl.int16, bitcast=True).to(tl.uint32) & 0xFFFF
            nan_bits = ((hb & 0x8000) << 16) | 0x7FC00000 | ((hb & 0x3FF) << 13)
            x = tl.where(h != h, nan_bits.to(tl.float32, bitcast=True), h.to(tl.float32))
        else:  # bfloat16 bits
            hb = tl.load(ptr + offsets, mask=mask, other=0).to(tl.uint32) & 0xFFFF
            x = (hb << 16).to(tl.float32, bitcast=True)
        if k == 0:
            a = x
        else:
            # One stage, as kernel.py's _stage: d = |a - b|; w = t / d; nan_to_num;
            # clamp; w*b; 1 - w; a*(1 - w); then the sum, a*(1 - w) first: where both
            # terms are NaN, the CPU (and the card's numpy) keeps that term's payload.
            t = tl.load(t_ptr + (k - 1))
            d = tl.abs(a - x)
            w = tl.div_rn(t, d)
            w = tl.where((w != w) | (tl.abs(w) == float("inf")), 1.0, w)
            w = tl.where(w < 0.0, 0.0, tl.where(w > 1.0, 1.0, w))
            bw = w * x
            one_minus_w = 1.0 - w
            a = a * one_minus_w
            a = a + bw
            if (OUT_F16 or OUT_BF16) and (ROUND or k == STAGES):
                # Round to the output's 16-bit type, to nearest even: `bits`.
                ab = a.to(tl.uint32, bitcast=True)
                if OUT_F16:
                    h = a.to(tl.float16)
                    nan16 = ((ab >> 16) & 0x8000) | 0x7E00 | ((ab >> 13) & 0x3FF)
                    bits = tl.where(a != a, nan16, h.to(tl.int16, bitcast=True).to(tl.uint32) & 0xFFFF)
                else:
                    bits = tl.where(a != a, 0xFFFF, (ab + (0x7FFF + ((ab >> 16) & 1))) >> 16)
                if ROUND and k < STAGES:  # widen back, as for an input
                    if OUT_F16:
                        nan_bits = ((bits & 0x8000) << 16) | 0x7FC00000 | ((bits & 0x3FF) << 13)
                        h = bits.to(tl.uint16).to(tl.float16, bitcast=True)
                        a = tl.where(h != h, nan_bits.to(tl.float32, bitcast=True), h.to(tl.float32))
                    else:
                        a = (bits << 16).to(tl.float32, bitcast=True)
    if OUT_F16:
        tl.store(out_ptr + offsets, bits.to(tl.uint16).to(tl.float16, bitcast=True), mask=mask)
    elif OUT_BF16:
        tl.store(out_ptr + offsets, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offsets, a, mask=mask)


#: Compiled for the GPU, and run by Triton's interpreter on the CPU (tests).
compiled = JITFunction(chain_kernel)
interpreted = InterpretedFunction(chain_kernel)


def arguments(inputs, thresholds, out, round_stages: bool, block: int = BLOCK):
    """(grid, args, kwargs) of one launch over flat contiguous `inputs` (int16 views for
    bfloat16) into `out`: the compiler options included."""
    n = out.numel()
    kwargs = {"STAGES": len(inputs) - 1, "ROUND": bool(round_stages), "BLOCK": block,
              "num_warps": NUM_WARPS, **OPTIONS}
    return (triton.cdiv(n, block),), (tuple(inputs), thresholds, out, n), kwargs


def launch(kernel, inputs, thresholds, out, round_stages: bool) -> None:
    """Run `kernel` (compiled or interpreted) over `inputs` into `out`."""
    block = INTERPRETER_BLOCK if kernel is interpreted else BLOCK
    grid, args, kwargs = arguments(inputs, thresholds, out, round_stages, block)
    kernel[grid](*args, **kwargs)

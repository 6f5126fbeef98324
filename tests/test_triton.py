"""The Triton kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1),
against the torch path; and its PTX, compiled for sm_80 and sm_90 without a GPU.

The interpreter computes with numpy's IEEE float32 arithmetic, so these tests check
the kernel's logic (operation order, NaN and infinity handling, the clamp, the
float16 and bfloat16 widening and rounding, strides, mixed dtypes, the fallback),
not the GPU's bits: the PTX tests check the instructions that decide those (correctly
rounded division, no FMA, no flush to zero, no min/max), and tests/test_gpu.py
compares the bits on a GPU. Skipped where Triton is not installed (only the
mergekit 0.1.5 environment has the `gpu` extra).
"""

import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mergekit_independent
from reference import card_nearswap, same_bits

pytest.importorskip("triton", reason="Triton is not installed (the `gpu` extra)")

from test_kernel import SPECIAL_BITS, THRESHOLDS, all_pairs_of_specials  # noqa: E402

from nearswap_mergekit import nearswap_chain  # noqa: E402
from nearswap_mergekit.method import _fused, _triton  # noqa: E402

pytestmark = mergekit_independent

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FUSED = _fused.fused_available()


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter on, the torch path not forced, the module's state fresh."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("NEARSWAP_MERGEKIT_KERNEL", raising=False)
    _triton.reset()
    yield
    _triton.reset()


def same_bits_nan_aside(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality except that any NaN equals any NaN (same positions)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    return same_bits(a[~nan], b[~nan])


def same_bits_where_one_nan_at_most(a, b, inputs) -> bool:
    """Bitwise equality, NaN payloads included, except where two inputs are NaN: numpy
    (and so the interpreter) returns either payload then, depending on the position."""
    several = sum(torch.isnan(x.float()).to(torch.int32) for x in inputs) >= 2
    return same_bits(a[~several], b[~several])


def triton_chain(base, secondaries, ts, **kwargs):
    """nearswap_chain through the Triton kernel, checking that the kernel ran."""
    before = _triton.launches
    out = nearswap_chain(base, secondaries, ts, backend="triton", **kwargs)
    assert _triton.launches > before
    return out


def inputs(shape, dtype, stages, seed=0):
    """A base and `stages` secondaries near it, with specials sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    models = [base] + [base + torch.randn(shape, generator=gen) * s for s in (1e-3, 1e-4, 1e-2)[:stages]]
    specials = torch.from_numpy(np.array(SPECIAL_BITS, dtype=np.uint32).view(np.float32))
    for k, model in enumerate(models):
        flat = model.view(-1)
        picks = torch.randint(0, flat.numel(), (len(specials),), generator=gen)
        flat[picks] = specials.roll(k)
    models = [m.to(dtype) for m in models]
    return models[0], models[1:]


@pytest.mark.parametrize("round_stages", [True, False])
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_gives_the_torch_paths_bits(dtype, stages, round_stages):
    base, secondaries = inputs((37, 131), dtype, stages, seed=stages)
    ts = [1e-4, 1e-3, 0.0][:stages]
    expected = nearswap_chain(base, secondaries, ts, round_stages=round_stages, backend="torch")
    out = triton_chain(base, secondaries, ts, round_stages=round_stages)
    assert same_bits_nan_aside(out, expected)
    if FUSED:  # the C kernel's NaNs do not depend on position: payloads equal too
        fused = nearswap_chain(base, secondaries, ts, round_stages=round_stages)
        assert same_bits_where_one_nan_at_most(out, fused, [base, *secondaries])


def every_16_bit_pattern(dtype):
    """All 65,536 bit patterns of a 16-bit float dtype, and two secondaries: the same
    patterns shuffled, and each pattern moved a few ULPs (NaNs, infinities, zeros of
    both signs and subnormals all meet every kind of value)."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    base = bits.view(dtype)
    gen = torch.Generator().manual_seed(16)
    shuffled = bits[torch.randperm(bits.numel(), generator=gen)].view(dtype)
    nudged = (bits.to(torch.int32) + torch.randint(-3, 4, bits.shape, generator=gen)).to(torch.int16)
    return base, [shuffled, nudged.view(dtype)]


@pytest.mark.parametrize("round_stages", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern(dtype, round_stages):
    base, secondaries = every_16_bit_pattern(dtype)
    for ts in ([1e-3], [1e-3, 0.0], [0.5, 1e-2]):
        chain = secondaries[: len(ts)]
        expected = nearswap_chain(base, chain, ts, round_stages=round_stages, backend="torch")
        out = triton_chain(base, chain, ts, round_stages=round_stages)
        assert same_bits_nan_aside(out, expected), ts
        if FUSED:
            fused = nearswap_chain(base, chain, ts, round_stages=round_stages)
            assert same_bits_where_one_nan_at_most(out, fused, [base, *chain]), ts


@pytest.mark.parametrize("t", THRESHOLDS)
def test_every_pair_of_special_float32_values_matches_the_card(t):
    """NaN (payloads too), ±inf, ±0, subnormals, ±max: every pair, every t."""
    v0, v1 = all_pairs_of_specials()
    out = triton_chain(torch.from_numpy(v0.copy()), [torch.from_numpy(v1.copy())], t)
    assert same_bits(out, torch.from_numpy(card_nearswap(t, v0, v1)))


def test_subnormal_weights_inputs_and_results_are_kept():
    """Subnormal inputs, a subnormal t/d and subnormal results: none flushed to zero."""
    tiny = torch.finfo(torch.float32).tiny  # smallest normal
    v0 = torch.tensor([tiny / 4, tiny / 2, -tiny / 8, 0.0, tiny / 2, 1e-45, 1.0])
    v1 = torch.tensor([tiny / 2, tiny / 4, tiny / 8, 1.0, 0.0, 0.0, 1.0 + 2**-23])
    for t in (1e-45, tiny / 16, 1e-40, 1e-38):
        out = triton_chain(v0, [v1], t)
        assert same_bits(out, nearswap_chain(v0, [v1], t, backend="torch"))
        assert same_bits(out, torch.from_numpy(card_nearswap(t, v0.numpy(), v1.numpy())))
    out = triton_chain(v0, [v1], 1e-40)
    # 0 -> 1 moved by exactly t = 1e-40 (w = t/1 is subnormal); tiny/2 -> 0 scaled by
    # 1 - w: subnormal products; the subnormal inputs move by subnormal steps.
    assert out[3] == torch.tensor(1e-40) and 0 < out[4] < tiny / 2
    assert ((out != 0) & (out.abs() < tiny)).sum() == 5


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_broadcast_inputs(dtype):
    base, secondaries = inputs((64, 96), dtype, 3, seed=5)
    cases = {
        "transposed": (base.t(), [s.t() for s in secondaries]),
        "every other column": (base[:, ::2], [s[:, ::2] for s in secondaries]),
        "one strided": (base[:, 1:], [secondaries[0][:, 1:], secondaries[1][:, 1:].contiguous(),
                                      secondaries[2][:, 1:]]),
        "broadcast row": (base, [secondaries[0][:1].expand(64, 96), *secondaries[1:]]),
        "0-d": (base[3, 4], [s[3, 4] for s in secondaries]),
    }
    for name, (b, s) in cases.items():
        ts = [1e-4, 1e-3, 1e-2]
        expected = nearswap_chain(b, s, ts, backend="torch")
        assert same_bits_nan_aside(triton_chain(b, s, ts), expected), name


def test_strided_inputs_are_buffered_in_at_most_one_output(monkeypatch):
    """Buffers for strided inputs hold at most the output's bytes together, and the
    pieces cover the output exactly once."""
    base, secondaries = inputs((50, 70), torch.bfloat16, 3, seed=7)
    b, s = base.t(), [x.t() for x in secondaries]
    allocated = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(_triton.torch, "empty", recording_empty)
    out = torch.full(b.shape, float("nan"), dtype=torch.bfloat16)
    assert _triton.run(b, s, [1e-4] * 3, True, out, allow_interpreter=True)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert 0 < sum(allocated) <= out.numel() * out.element_size()
    assert same_bits_nan_aside(out, nearswap_chain(b, s, [1e-4] * 3, backend="torch"))


@pytest.mark.parametrize("shape,budget", [((7,), 3), ((5, 6), 12), ((5, 6), 4), ((2, 3, 4), 5),
                                          ((2, 3, 4), 1), ((4, 4), 100)])
def test_pieces_cover_a_shape_once_within_the_budget(shape, budget):
    seen = torch.zeros(shape, dtype=torch.int32)
    for index in _triton.pieces(shape, budget):
        piece = seen[index]
        assert piece.numel() <= budget and piece.is_contiguous()
        piece += 1
    assert bool((seen == 1).all())


@pytest.mark.parametrize("dtypes", [
    (torch.float16, torch.bfloat16, torch.float16),
    (torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
])
@pytest.mark.parametrize("round_stages", [True, False])
def test_mixed_dtypes_promote_like_the_torch_path(dtypes, round_stages):
    base, secondaries = inputs((40, 50), torch.float32, 2, seed=11)
    base, *secondaries = (x.to(d) for x, d in zip([base, *secondaries], dtypes))
    ts = [1e-3, 1e-4]
    expected = nearswap_chain(base, secondaries, ts, round_stages=round_stages, backend="torch")
    out = triton_chain(base, secondaries, ts, round_stages=round_stages)
    assert out.dtype == expected.dtype
    assert same_bits_nan_aside(out, expected)


def test_float64_falls_back_to_the_torch_path_silently(caplog):
    base, secondaries = inputs((10, 10), torch.float64, 2)
    before = _triton.launches
    with caplog.at_level(logging.WARNING, logger="nearswap_mergekit"):
        assert not _triton.run(base, secondaries, [1e-3] * 2, True, torch.empty_like(base),
                               allow_interpreter=True)
    assert _triton.launches == before and not caplog.records
    with pytest.raises(RuntimeError, match="Triton kernel does not apply"):
        nearswap_chain(base, secondaries, 1e-3, backend="triton")


def test_the_environment_variable_chooses_the_torch_path(monkeypatch, caplog):
    monkeypatch.setenv("NEARSWAP_MERGEKIT_KERNEL", "torch")
    base, secondaries = inputs((10, 10), torch.float16, 2)
    with caplog.at_level(logging.WARNING, logger="nearswap_mergekit"):
        assert not _triton.run(base, secondaries, [1e-3] * 2, True, torch.empty_like(base),
                               allow_interpreter=True)
        with pytest.raises(RuntimeError, match="NEARSWAP_MERGEKIT_KERNEL=torch"):
            nearswap_chain(base, secondaries, 1e-3, backend="triton")
    assert not caplog.records


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    base, secondaries = inputs((10, 10), torch.float32, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nearswap_chain(base, secondaries, 1e-3, backend="triton")
    before = _triton.launches
    nearswap_chain(base, secondaries, 1e-3)  # auto: never the interpreter
    assert _triton.launches == before


def test_triton_missing_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nearswap_mergekit.method._triton_kernel", None)
    base, secondaries = inputs((10, 10), torch.bfloat16, 2)
    with caplog.at_level(logging.WARNING, logger="nearswap_mergekit"):
        for _ in range(3):
            assert not _triton.run(base, secondaries, [1e-3] * 2, True, torch.empty_like(base),
                                   allow_interpreter=True)
    [record] = caplog.records
    assert "Triton is not installed" in record.getMessage()
    assert "triton==3.7.1" in record.getMessage() and "NEARSWAP_MERGEKIT_KERNEL=torch" in record.getMessage()


def test_a_kernel_that_fails_to_compile_warns_once_and_falls_back(monkeypatch, caplog):
    module = _triton.kernel_module()

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(module, "launch", broken)
    base, secondaries = inputs((10, 10), torch.float16, 2)
    with caplog.at_level(logging.WARNING, logger="nearswap_mergekit"):
        for _ in range(3):
            assert not _triton.run(base, secondaries, [1e-3] * 2, True, torch.empty_like(base),
                                   allow_interpreter=True)
    [record] = caplog.records
    assert "Failed to find C compiler" in record.getMessage()


def test_importing_the_package_and_merging_on_the_cpu_import_no_triton():
    code = ("import sys, torch\n"
            "from nearswap_mergekit import nearswap_chain\n"
            "nearswap_chain(torch.ones(3), [torch.zeros(3)], 1e-3)\n"
            "print('triton' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- the PTX: compiled for sm_80 and sm_90 without a GPU -----------------------------------


def compile_ptx(capability: int, element: str, out: str, **options) -> str:
    """The kernel's PTX for three stages of inputs of `element` type into `out`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _triton.kernel_module()
    signature = {"inputs": (element,) * 4, "t_ptr": "*fp32", "out_ptr": out, "n": "i64",
                 "STAGES": "constexpr", "ROUND": "constexpr", "BLOCK": "constexpr"}
    source = ASTSource(module.compiled, signature,
                       constexprs={"STAGES": 3, "ROUND": True, "BLOCK": module.BLOCK})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": module.NUM_WARPS, **module.OPTIONS, **options})
    except Exception as error:  # e.g. a Triton without its bundled ptxas
        pytest.skip(f"cannot compile for sm_{capability} here: {type(error).__name__}: {error}")
    return compiled.asm["ptx"]


def float_instructions(ptx: str):
    """The opcodes (with their modifiers) of the PTX's instructions."""
    return set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)+)", ptx, re.M))


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("element,out", [("*fp16", "*fp16"), ("*i16", "*i16"), ("*fp32", "*fp32")])
def test_ptx_is_ieee(capability, element, out):
    ops = float_instructions(compile_ptx(capability, element, out))
    assert "div.rn.f32" in ops
    assert not [op for op in ops if op.startswith("div.") and op != "div.rn.f32"
                and not op.startswith(("div.s", "div.u"))]  # no div.full / div.approx
    assert not [op for op in ops if op.startswith(("fma.", "mad.")) and ".f" in op]
    assert not [op for op in ops if op.startswith(("min.", "max.")) and ".f" in op]
    assert not [op for op in ops if ".ftz" in op or op.startswith(("rcp.", "ex2.", "lg2."))]
    arithmetic = [op for op in ops if op.startswith(("add.", "sub.", "mul.")) and op.endswith(".f32")]
    assert arithmetic and all(".rn." in op for op in arithmetic)  # rounded as written: no contraction by ptxas


def test_the_ptx_check_sees_fusion():
    """With fusion left on, the same kernel has FMAs: the check above is not vacuous."""
    ops = float_instructions(compile_ptx(90, "*fp32", "*fp32", enable_fp_fusion=True))
    assert any(op.startswith("fma.") for op in ops)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_gpu_benchmark_without_cuda_says_why_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("nearswap_gpu_benchmark", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = CliRunner().invoke(benchmark.main, ["--results", str(tmp_path / "results"),
                                                 "--work", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "no CUDA device" in result.stderr and not result.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_the_launch_path_compiles_the_kernel_as_checked(monkeypatch):
    """What a launch on a GPU compiles (Triton's JIT, the kernel's own arguments and
    options, bound to tensors) has the same IEEE PTX: compiled for sm_90 with a
    stand-in for the CUDA driver, and not launched."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class NoGPU:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

    module = _triton.kernel_module()
    inputs = [torch.zeros(4096, dtype=torch.float16), torch.zeros(4096, dtype=torch.int16),
              torch.zeros(4096, dtype=torch.float32)]
    grid, args, kwargs = module.arguments(inputs, torch.zeros(2), torch.empty(4096, dtype=torch.int16), True)
    monkeypatch.setattr(driver, "_active", NoGPU())
    try:
        compiled = module.compiled.warmup(*args, grid=grid, **kwargs)
    except Exception as error:
        pytest.skip(f"cannot compile for sm_90 here: {type(error).__name__}: {error}")
    assert compiled.metadata.enable_fp_fusion is False
    ops = float_instructions(compiled.asm["ptx"])
    assert "div.rn.f32" in ops and not [op for op in ops if op.startswith(("fma.", "div.full", "div.approx"))]
    assert not [op for op in ops if ".ftz" in op or (op.startswith(("min.", "max.")) and ".f" in op)]

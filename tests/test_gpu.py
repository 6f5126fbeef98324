"""On a CUDA device: the kernel and a stock `mergekit-yaml --cuda` merge give the CPU's bits.

Skipped without a GPU. (NaN bit patterns are the one thing a GPU may produce
differently: CUDA's default NaN is 0x7fffffff, x86's 0xffc00000.) The Triton kernel's
tests need Triton too; they are the proof of its bits (tests/test_triton.py checks
its logic on the CPU, through Triton's interpreter, and its PTX)."""

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from conftest import CONFIGS, mergekit_independent
from reference import card_nearswap, same_bits
from safetensors.torch import load_file
from test_kernel import SPECIAL_BITS

from nearswap_mergekit import nearswap_chain
from nearswap_mergekit.method import _triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernel_on_the_gpu_gives_the_cpu_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1000, 3000, generator=gen) * 0.02
    models = [(base + torch.randn(base.shape, generator=gen) * d).to(dtype) for d in (0, 1e-2, 1e-3, 1e-2)]
    ts = [1e-4, 1e-3, 3e-3]
    cpu = nearswap_chain(models[0], models[1:], ts)
    gpu = nearswap_chain(models[0].cuda(), [m.cuda() for m in models[1:]], ts)
    assert gpu.device.type == "cuda"
    assert same_bits(cpu, gpu.cpu())


def test_mergekit_yaml_with_cuda_gives_the_cpu_bits(workspace):
    shutil.copy(CONFIGS / "demo-quartet.yml", workspace.root / "gpu.yml")
    workspace.merge("gpu.yml", "gpu-cpu-out")
    workspace.merge("gpu.yml", "gpu-cuda-out", "--cuda")
    cpu = load_file(str(workspace.root / "gpu-cpu-out" / "model.safetensors"))
    gpu = load_file(str(workspace.root / "gpu-cuda-out" / "model.safetensors"))
    assert all(same_bits(cpu[n], gpu[n]) for n in cpu)


# --- the Triton kernel: the CPU's bits on the GPU ------------------------------------------
# NaN bit patterns aside: a NaN that the GPU's arithmetic makes is CUDA's default NaN.

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs Triton (the `gpu` extra)")
SPECIALS = torch.tensor(np.array(SPECIAL_BITS, dtype=np.uint32).view(np.int32)).view(torch.float32)


def same_bits_nan_aside(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and same_bits(a[~nan], b[~nan])


def on_gpu(base, secondaries, ts, **kwargs):
    """The chain on the GPU through the Triton kernel (it raises where the kernel does
    not apply), back on the CPU; and that the kernel ran."""
    before = _triton.launches
    out = nearswap_chain(base.cuda(), [s.cuda() for s in secondaries], ts, backend="triton", **kwargs)
    assert _triton.launches > before
    return out.cpu()


def with_specials(shape, dtype, stages, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    models = [base] + [base + torch.randn(shape, generator=gen) * s for s in (1e-3, 1e-4, 1e-2)[:stages]]
    for k, model in enumerate(models):
        flat = model.view(-1)
        flat[torch.randint(0, flat.numel(), (len(SPECIALS),), generator=gen)] = SPECIALS.roll(k)
    models = [m.to(dtype) for m in models]
    return models[0], models[1:]


@mergekit_independent
@needs_triton
@pytest.mark.parametrize("round_stages", [True, False])
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_gives_the_cpu_bits(dtype, stages, round_stages):
    base, secondaries = with_specials((1000, 3000), dtype, stages, seed=stages)
    ts = [1e-4, 1e-3, 0.0][:stages]
    cpu = nearswap_chain(base, secondaries, ts, round_stages=round_stages)
    assert same_bits_nan_aside(on_gpu(base, secondaries, ts, round_stages=round_stages), cpu)


@mergekit_independent
@needs_triton
@pytest.mark.parametrize("round_stages", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_on_every_16_bit_pattern(dtype, round_stages):
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    gen = torch.Generator().manual_seed(16)
    nudged = (bits.to(torch.int32) + torch.randint(-3, 4, bits.shape, generator=gen)).to(torch.int16)
    base = bits.view(dtype)
    secondaries = [bits[torch.randperm(bits.numel(), generator=gen)].view(dtype), nudged.view(dtype)]
    for ts in ([1e-3], [1e-3, 0.0], [0.5, 1e-2]):
        chain = secondaries[: len(ts)]
        cpu = nearswap_chain(base, chain, ts, round_stages=round_stages)
        assert same_bits_nan_aside(on_gpu(base, chain, ts, round_stages=round_stages), cpu), ts


@mergekit_independent
@needs_triton
@pytest.mark.parametrize("t", [0.0, 1e-45, 1e-4, 1e-3, 1.0, 3.4e38])
def test_triton_kernel_on_every_pair_of_special_values(t):
    """NaN, ±inf, ±0, subnormals (division, no flush to zero), ±max, against the card."""
    v0, v1 = SPECIALS.repeat_interleave(len(SPECIALS)), SPECIALS.repeat(len(SPECIALS))
    card = torch.from_numpy(card_nearswap(t, v0.numpy(), v1.numpy()))
    assert same_bits_nan_aside(on_gpu(v0, [v1], t), card)


@mergekit_independent
@needs_triton
def test_triton_kernel_keeps_subnormals():
    tiny = torch.finfo(torch.float32).tiny
    v0 = torch.tensor([tiny / 4, tiny / 2, -tiny / 8, 0.0, tiny / 2, 1e-45, 1.0])
    v1 = torch.tensor([tiny / 2, tiny / 4, tiny / 8, 1.0, 0.0, 0.0, 1.0 + 2**-23])
    for t in (1e-45, tiny / 16, 1e-40, 1e-38):
        assert same_bits(on_gpu(v0, [v1], t), nearswap_chain(v0, [v1], t)), t
    for dtype in (torch.float16, torch.bfloat16):  # each type's subnormals, widened and rounded
        small = torch.finfo(dtype).tiny
        h0 = torch.tensor([small / 4, -small / 2, small / 8, 0.0]).to(dtype)
        h1 = torch.tensor([small / 2, small / 4, 0.0, small]).to(dtype)
        assert same_bits(on_gpu(h0, [h1, h0], [small / 16, 0.0]), nearswap_chain(h0, [h1, h0], [small / 16, 0.0]))


@mergekit_independent
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_on_strided_and_mixed_inputs(dtype):
    base, secondaries = with_specials((640, 960), dtype, 3, seed=5)
    ts = [1e-4, 1e-3, 1e-2]
    cases = {
        "transposed": (base.t(), [s.t() for s in secondaries]),
        "every other column": (base[:, ::2], [s[:, ::2] for s in secondaries]),
        "one strided": (base, [secondaries[0].t().contiguous().t(), *secondaries[1:]]),
        "mixed dtypes": (base.half(), [secondaries[0].bfloat16(), *secondaries[1:]]),
    }
    for name, (b, s) in cases.items():
        cpu = nearswap_chain(b, s, ts)
        gpu = nearswap_chain(b.cuda(), [x.cuda() for x in s], ts, backend="triton")
        assert same_bits_nan_aside(gpu.cpu(), cpu), name


@mergekit_independent
@needs_triton
def test_auto_runs_the_triton_kernel_on_cuda(monkeypatch):
    """The Triton kernel, not the fallback, runs by default; the variable turns it off."""
    monkeypatch.delenv("NEARSWAP_MERGEKIT_KERNEL", raising=False)
    base, secondaries = with_specials((100, 100), torch.bfloat16, 2, seed=1)
    before = _triton.launches
    gpu = nearswap_chain(base.cuda(), [s.cuda() for s in secondaries], 1e-3)
    assert _triton.launches == before + 1
    monkeypatch.setenv("NEARSWAP_MERGEKIT_KERNEL", "torch")
    torch_path = nearswap_chain(base.cuda(), [s.cuda() for s in secondaries], 1e-3)
    assert _triton.launches == before + 1
    assert same_bits_nan_aside(gpu.cpu(), torch_path.cpu())

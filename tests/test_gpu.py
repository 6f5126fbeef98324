"""On a CUDA device: the kernel and a stock `mergekit-yaml --cuda` merge give the CPU's bits.

Skipped without a GPU. (NaN bit patterns are the one thing a GPU may produce
differently: CUDA's default NaN is 0x7fffffff, x86's 0xffc00000.)"""

import shutil

import pytest
import torch
from conftest import CONFIGS
from reference import same_bits
from safetensors.torch import load_file

from nearswap_mergekit import nearswap_chain

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

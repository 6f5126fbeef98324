"""mergekit 0.1.4's adapter in-process: its task, as mergekit's executor calls it."""

import pytest
import torch
from conftest import ON_MERGEKIT_015
from reference import reference_chain, same_bits

if ON_MERGEKIT_015:
    pytest.skip("mergekit 0.1.4's adapter", allow_module_level=True)

from mergekit.common import ModelReference  # noqa: E402
from nearswap_mergekit.method.adapter_014 import method_for  # noqa: E402

NearSwapChainTask = method_for("mergekit").task_class

MODELS = [ModelReference.parse(f"./models/{name}") for name in ("base", "a", "b")]


def task(weight="w"):
    # execute() reads only these fields; the tensors arrive as its argument.
    return NearSwapChainTask.model_construct(
        base_model=MODELS[0], secondaries=tuple(MODELS[1:]), thresholds=(1e-3, 1e-2),
        round_stages=True, weight_name=weight,
    )


def test_float_weights_are_merged_in_the_order_of_models():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(8, 16, generator=gen).to(torch.bfloat16) for _ in MODELS]
    out = task().execute(dict(zip(MODELS, tensors)))
    assert same_bits(out, reference_chain(tensors[0], tensors[1:], [1e-3, 1e-2]))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_agreeing_integer_buffers_pass_through_as_on_mergekit_015(dtype):
    buffer = torch.arange(6).reshape(2, 3).to(dtype)
    out = task("position_ids").execute({m: buffer.clone() for m in MODELS})
    assert out.dtype == dtype and torch.equal(out, buffer)


def test_differing_integer_buffers_are_named():
    buffers = {m: torch.arange(6) + i for i, m in enumerate(MODELS)}
    with pytest.raises(ValueError, match="non-floating buffer 'position_ids' differs"):
        task("position_ids").execute(buffers)

"""The mergekit adapter in-process: registry, merge_tensors, merge_state_dicts."""

import pytest
import torch
from conftest import ON_MERGEKIT_015
from reference import reference_chain, same_bits

import nearswap_mergekit
from mergekit import merge_methods

if not ON_MERGEKIT_015:
    pytest.skip("mergekit 0.1.5's in-memory merge API", allow_module_level=True)

from mergekit.merge_methods import TensorGroup, merge_state_dicts, merge_tensors  # noqa: E402


def quartet(dtype=torch.bfloat16, shape=(33, 65)):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=gen) * 0.02
    return [(base + torch.randn(shape, generator=gen) * d).to(dtype) for d in (0, 1e-2, 1e-3, 1e-2)]


def test_registered_with_its_spec():
    method = merge_methods.get("nearswap_chain")
    assert method.spec.pretty_name == "NearSwap chain"
    assert "QuartetAnemoi-70B-t0.0001" in method.spec.reference_url
    assert {p.name for p in method.spec.parameters} == {"t", "round_stages"}
    assert merge_methods.get("nearswap") is not method  # mergekit's own is left alone


def test_register_is_idempotent():
    assert nearswap_mergekit.register() is True
    assert nearswap_mergekit.register() is True
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert names.count("nearswap_chain") == 1


@pytest.mark.parametrize("t", [1e-3, [1e-2, 1e-4, 5e-3]])
def test_merge_tensors_equals_the_reference(t):
    tensors = quartet()
    out = merge_tensors(tensors, "nearswap_chain", parameters={"t": t}, base_index=0)
    ts = t if isinstance(t, list) else [t] * 3
    assert same_bits(out, reference_chain(tensors[0], tensors[1:], ts))


def test_base_index_picks_the_base_and_stages_follow_input_order():
    a, b, c, d = quartet()
    out = merge_tensors([b, a, c, d], "nearswap_chain", parameters={"t": 1e-2}, base_index=1)
    assert same_bits(out, reference_chain(a, [b, c, d], [1e-2] * 3))


def test_merge_state_dicts():
    tensors = quartet(torch.float16)
    models = {
        name: {"w": tensor, "v": tensor[0].clone(), "step": torch.tensor(7)}
        for name, tensor in zip("abcd", tensors)
    }
    merged = merge_state_dicts(models, "nearswap_chain", parameters={"t": 1e-3}, base="a")
    assert same_bits(merged["w"], reference_chain(tensors[0], tensors[1:], [1e-3] * 3))
    assert same_bits(
        merged["v"], reference_chain(tensors[0][0], [t[0] for t in tensors[1:]], [1e-3] * 3)
    )
    assert merged["step"].item() == 7


def test_secondaries_missing_a_weight_are_skipped_for_it():
    a, b, c, d = quartet()
    group = TensorGroup.from_tensors([a, b, d], ids=["a", "b", "d"], base_index=0)
    method = merge_methods.get("nearswap_chain")
    (out,) = method((group,), parameters={"t": {"b": 1e-2, "d": 1e-3}})
    assert same_bits(out, reference_chain(a, [b, d], [1e-2, 1e-3]))


def test_t_sequence_of_the_wrong_length_names_the_problem():
    with pytest.raises(ValueError, match="Parameter t expects 3 values; got 2"):
        merge_tensors(quartet(), "nearswap_chain", parameters={"t": [1e-4, 1e-4]}, base_index=0)


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), float("inf")])
def test_bad_t_in_merge_tensors(bad):
    with pytest.raises(ValueError, match="t must be a finite number >= 0"):
        merge_tensors(quartet(), "nearswap_chain", parameters={"t": bad}, base_index=0)


def test_no_base_or_no_secondary_in_merge_tensors():
    tensors = quartet()
    with pytest.raises(ValueError, match="requires a base input"):
        merge_tensors(tensors, "nearswap_chain", parameters={"t": 1e-4})
    with pytest.raises(ValueError, match="at least 1 non-base"):
        merge_tensors(tensors[:1], "nearswap_chain", parameters={"t": 1e-4}, base_index=0)

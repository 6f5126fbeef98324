"""The pure-torch kernel against the card's numpy formula, bit for bit."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import mergekit_independent
from hypothesis.extra import numpy as hnp
from reference import card_nearswap, reference_chain, same_bits

from nearswap_mergekit.method import _fused
from nearswap_mergekit import nearswap, nearswap_chain

pytestmark = mergekit_independent


SPECIAL_BITS = [
    0x00000000, 0x80000000,  # +0, -0
    0x7F800000, 0xFF800000,  # +inf, -inf
    0x7FC00000, 0xFFC00000, 0x7FC12345, 0xFFD00001,  # quiet NaNs, payloads
    0x7F800001, 0xFF800ABC,  # signalling NaNs
    0x00000001, 0x80000001, 0x007FFFFF,  # subnormals
    0x00800000, 0x3C23D70A, 0xBC23D70A,  # smallest normal, +-0.01
    0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000,  # +-max, 1
]
THRESHOLDS = [0.0, 1e-45, 1e-4, 1e-3, 1.0, 3.4e38]
FUSED = _fused.fused_available()
needs_fused = pytest.mark.skipif(not FUSED, reason="the fused kernel cannot be built here")
#: For parametrize; hypothesis draws from AVAILABLE_BACKENDS.
BACKENDS = ["torch", pytest.param("fused", marks=needs_fused)]
AVAILABLE_BACKENDS = ["torch", "fused"] if FUSED else ["torch"]


def all_pairs_of_specials():
    values = np.array(SPECIAL_BITS, dtype=np.uint32).view(np.float32)
    return np.repeat(values, len(values)), np.tile(values, len(values))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", THRESHOLDS)
def test_every_pair_of_special_values_matches_the_card(t, backend):
    v0, v1 = all_pairs_of_specials()
    out = nearswap(torch.from_numpy(v0.copy()), torch.from_numpy(v1.copy()), t, backend=backend)
    assert same_bits(out, torch.from_numpy(card_nearswap(t, v0, v1)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_special_values_in_half_precision_chains(dtype, backend):
    v0, v1 = (torch.from_numpy(v).to(dtype) for v in all_pairs_of_specials())
    v2 = v1.flip(0).clone()
    ts = [1e-3, 0.0]
    out = nearswap_chain(v0, [v1, v2], ts, backend=backend)
    assert same_bits(out, reference_chain(v0, [v1, v2], ts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [37, 1000, 4133])
def test_float16_nan_payloads_survive_at_every_position(length, backend):
    """torch's own float16 -> float32 conversion drops NaN payloads in the scalar
    tail of its loops (which positions depends on the length); the kernel must not.
    (NaNs sit in one input per position: where both inputs are NaN, numpy itself
    returns either payload depending on the position, so there is no one answer.)"""
    gen = torch.Generator().manual_seed(length)
    v0 = (torch.randn(length, generator=gen) * 0.02).to(torch.float16)
    v1 = (v0.float() + torch.randn(length, generator=gen) * 1e-3).to(torch.float16)
    v2 = (v0.float() + torch.randn(length, generator=gen) * 1e-3).to(torch.float16)
    payloads = torch.tensor([0x7E01, 0xFE55 - 0x10000, 0x7C01, 0x7FFF], dtype=torch.int16)
    for tensor, offset in ((v0, 0), (v1, 1)):
        bits = tensor.view(torch.int16)
        bits[offset::3] = payloads.repeat(length)[: len(bits[offset::3])]
    for secondaries, ts in (([v1], [1e-3]), ([v1, v2], [1e-3, 0.0])):
        out = nearswap_chain(v0, secondaries, ts, backend=backend)
        assert same_bits(out, reference_chain(v0, secondaries, ts))


def test_difference_exactly_t_is_swapped_and_identical_weights_stay():
    v0 = torch.tensor([0.5, 0.25, 0.1, 0.0], dtype=torch.float32)
    v1 = v0 + torch.tensor([0.125, 0.0, 0.5, 0.0])
    out = nearswap(v0, v1, 0.125)
    expected = torch.from_numpy(card_nearswap(0.125, v0.numpy(), v1.numpy()))
    assert same_bits(out, expected)
    assert out[0] == v1[0]  # |v0 - v1| == t: w == 1, full swap
    assert out[1] == v0[1] and out[3] == 0.0
    assert out[2] == pytest.approx(0.1 + 0.125)  # moved toward v1 by exactly t


@pytest.mark.parametrize("t", [1e-4, 0.0, 1e-2])
def test_float64_computes_in_float64(t):
    gen = np.random.default_rng(0)
    v0 = gen.normal(0, 0.02, 5000)
    v1 = v0 + gen.normal(0, 1e-3, 5000)
    out = nearswap(torch.from_numpy(v0), torch.from_numpy(v1), t)
    assert out.dtype == torch.float64
    assert same_bits(out, torch.from_numpy(card_nearswap(t, v0, v1)))


def quartet(dtype, shape=(37, 129), seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.02
    models = [base] + [base + torch.randn(shape, generator=gen) * 0.01 for _ in range(3)]
    return [m.to(dtype) for m in models]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("round_stages", [True, False])
def test_chain_matches_reference_for_each_dtype(dtype, round_stages, backend):
    base, *secondaries = quartet(dtype)
    ts = [1e-4, 3e-3, 1e-2]
    out = nearswap_chain(base, secondaries, ts, round_stages=round_stages, backend=backend)
    assert out.dtype == dtype
    assert same_bits(out, reference_chain(base, secondaries, ts, round_stages))


def test_rounding_stages_matters_in_half_precision():
    base, *secondaries = quartet(torch.bfloat16)
    rounded = nearswap_chain(base, secondaries, 1e-2, round_stages=True)
    carried = nearswap_chain(base, secondaries, 1e-2, round_stages=False)
    assert not same_bits(rounded, carried)


@pytest.mark.parametrize("block_size", [1, 7, 129, 130, 4096, 1 << 20])
def test_block_size_never_changes_a_bit(block_size):
    """block_size is the torch path's: this runs that path (the fused one ignores it)."""
    base, *secondaries = quartet(torch.bfloat16, shape=(61, 129))
    ts = [1e-4, 1e-3, 1e-2]
    assert same_bits(
        nearswap_chain(base, secondaries, ts, block_size=block_size, backend="torch"),
        reference_chain(base, secondaries, ts),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_never_changes_a_bit(backend):
    base, *secondaries = quartet(torch.float16, shape=(700, 1100))
    # Large enough that both paths split the work: the fused path below
    # PARALLEL_MIN elements, torch's ops below its 32768-element grain, use one thread.
    assert base.numel() >= 2 * _fused.PARALLEL_MIN
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nearswap_chain(base, secondaries, 1e-3, backend=backend)
        torch.set_num_threads(max(2, threads))
        many = nearswap_chain(base, secondaries, 1e-3, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert same_bits(one, many)
    assert same_bits(one, reference_chain(base, secondaries, [1e-3] * 3))


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_and_torch_paths_agree_on_large_tensors(dtype):
    base, *secondaries = quartet(dtype, shape=(1001, 1029), seed=3)
    ts = [1e-4, 1e-3, 3e-3]
    fused = nearswap_chain(base, secondaries, ts, backend="fused")
    assert same_bits(fused, nearswap_chain(base, secondaries, ts, backend="torch"))


def test_fused_path_refuses_what_it_cannot_do():
    base, secondary = quartet(torch.float32)[:2]
    with pytest.raises(RuntimeError, match="backend='auto'"):
        nearswap_chain(base.t(), [secondary.t()], 1e-3, backend="fused")


def test_non_contiguous_inputs():
    base, *secondaries = quartet(torch.float32, shape=(64, 96))
    views = [base.t(), *(s[:, ::2].repeat(1, 2).t() for s in secondaries)]
    assert not any(v.is_contiguous() for v in views)
    out = nearswap_chain(views[0], views[1:], 1e-2, block_size=100)
    assert out.is_contiguous()
    assert same_bits(out, reference_chain(views[0], views[1:], [1e-2] * 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (0,), (3, 0, 2), (5, 1, 1, 3), (3, 1025)])
def test_odd_shapes(shape, backend):
    base, *secondaries = quartet(torch.float32, shape=shape)
    out = nearswap_chain(base, secondaries, 1e-2, block_size=2, backend=backend)
    assert out.shape == base.shape
    assert same_bits(out, reference_chain(base, secondaries, [1e-2] * 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_and_requires_grad_inputs_give_the_same_bits_without_autograd(backend):
    base, *secondaries = quartet(torch.float32, shape=(64, 80))
    expected = reference_chain(base, secondaries, [1e-3] * 3)
    parameters = [torch.nn.Parameter(base.clone()), *(s.clone().requires_grad_() for s in secondaries)]
    out = nearswap_chain(parameters[0], parameters[1:], 1e-3, backend=backend)
    assert same_bits(out, expected)
    assert not out.requires_grad and out.grad_fn is None
    assert all(p.grad is None for p in parameters)


@pytest.mark.parametrize(
    "t", [np.float32(1e-3), np.float64(1e-3), np.array(1e-3), [np.float32(1e-3)] * 3,
          np.full(3, 1e-3, dtype=np.float32)],
    ids=["float32", "float64", "0-d array", "list of float32", "array of float32"],
)
def test_numpy_thresholds_are_accepted(t):
    base, *secondaries = quartet(torch.float32)
    expected = reference_chain(base, secondaries, [1e-3] * 3)  # t is float32 in the kernel anyway
    assert same_bits(nearswap_chain(base, secondaries, t), expected)


def test_inputs_are_not_modified():
    models = quartet(torch.float16)
    before = [m.clone() for m in models]
    nearswap_chain(models[0], models[1:], 1e-3)
    assert all(same_bits(m, b) for m, b in zip(models, before))


def test_mixed_dtypes_promote_like_mergekit():
    base = quartet(torch.float16)[0]
    secondary = quartet(torch.bfloat16, seed=1)[1]
    out = nearswap_chain(base, [secondary], 1e-3)
    assert out.dtype == torch.float32  # torch.promote_types(float16, bfloat16)
    assert same_bits(out, reference_chain(base, [secondary], [1e-3]))


@pytest.mark.parametrize("bad_t", [-1e-4, float("nan"), float("inf"), "0.1", True])
def test_bad_threshold_is_rejected(bad_t):
    base, secondary = quartet(torch.float32)[:2]
    with pytest.raises(ValueError, match="t must be"):
        nearswap_chain(base, [secondary], bad_t)


def test_threshold_count_must_match_secondaries():
    base, *secondaries = quartet(torch.float32)
    with pytest.raises(ValueError, match="t has 2 values but there are 3 secondaries"):
        nearswap_chain(base, secondaries, [1e-4, 1e-4])


def test_shape_mismatch_and_missing_secondaries_are_named():
    base = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"secondaries\[1\] is \(4, 3\)"):
        nearswap_chain(base, [torch.zeros(3, 4), torch.zeros(4, 3)], 1e-4)
    with pytest.raises(ValueError, match="at least one secondary"):
        nearswap_chain(base, [], 1e-4)
    with pytest.raises(TypeError, match="floating-point"):
        nearswap_chain(base, [torch.zeros(3, 4, dtype=torch.int32)], 1e-4)


# float32 values including every special value; arrays of random lengths.
float32_values = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    t=st.floats(0, 1e3, allow_nan=False, allow_subnormal=True),
    block_size=st.integers(1, 64),
    backend=st.sampled_from(AVAILABLE_BACKENDS),
)
def test_property_matches_card_bitwise(data, t, block_size, backend):
    v0 = data.draw(hnp.arrays(np.float32, st.integers(1, 300), elements=float32_values))
    v1 = data.draw(hnp.arrays(np.float32, v0.shape, elements=float32_values))
    out = nearswap(torch.from_numpy(v0), torch.from_numpy(v1), t, block_size=block_size, backend=backend)
    expected = card_nearswap(t, v0, v1)
    # Where both inputs are NaN, numpy itself returns either input's NaN depending on
    # the position (its vector body and scalar tail differ), so there is no one answer:
    # the kernel must give one of the two, quietened; every other position is bitwise.
    both_nan = np.isnan(v0) & np.isnan(v1)
    out_bits = out.numpy().view(np.uint32)
    quiet = np.uint32(0x00400000)
    either = (out_bits == (v0.view(np.uint32) | quiet)) | (out_bits == (v1.view(np.uint32) | quiet))
    assert either[both_nan].all()
    expected[both_nan] = out.numpy()[both_nan]
    assert same_bits(out, torch.from_numpy(expected))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    ts=st.lists(st.sampled_from([0.0, 1e-5, 1e-4, 1e-3, 1e-2]), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    backend=st.sampled_from(AVAILABLE_BACKENDS),
)
def test_property_chain_matches_reference(seed, ts, dtype, backend):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(17, 33, generator=gen) * 0.02
    secondaries = [(base + torch.randn(17, 33, generator=gen) * 1e-3).to(dtype) for _ in ts]
    base = base.to(dtype)
    out = nearswap_chain(base, secondaries, ts, backend=backend)
    assert same_bits(out, reference_chain(base, secondaries, ts))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_statistics_agree_between_paths_and_with_the_chain(dtype):
    from nearswap_mergekit.method.kernel import chain_with_row_stats

    base, *secondaries = quartet(dtype, shape=(50, 300), seed=5)
    base[0, :19] = torch.tensor([float(v) for v in np.array(SPECIAL_BITS, np.uint32).view(np.float32)]).to(dtype)
    ts = [1e-4, 1e-3, 1e-2]
    fused = chain_with_row_stats(base, secondaries, ts, backend="auto")
    plain = chain_with_row_stats(base, secondaries, ts, backend="torch")
    for counts_f, counts_t in zip(fused[:3] + fused[4:], plain[:3] + plain[4:]):
        assert torch.equal(counts_f, counts_t)
    assert fused[4][0, 0] == (~torch.isfinite(base[0])).sum() > 0  # the special values' row
    assert torch.allclose(fused[3], plain[3], rtol=1e-12, atol=0)
    # The counts are those of the chain itself, stage by stage.
    a = base
    for k, (secondary, t) in enumerate(zip(secondaries, ts)):
        result = nearswap_chain(a, [secondary], t)
        moved = (result != a) & torch.isfinite((result.double() - a.double()).abs())
        assert torch.equal(fused[0][k], (a == secondary).sum(1))
        assert torch.equal(fused[2][k], moved.sum(1))
        a = result


@needs_fused
def test_row_statistics_in_inference_mode_on_the_parallel_path():
    """`ladder` counts swaps inside its forwards' inference mode, with tensors large
    enough for the fused kernel's worker threads: they must write there too."""
    from nearswap_mergekit.method.kernel import chain_with_row_stats

    if min(torch.get_num_threads(), os.cpu_count() or 1) < 2:
        pytest.skip("one thread: the fused kernel does not split the work")
    base, *secondaries = quartet(torch.bfloat16, shape=(256, 4096), seed=3)
    ts = [1e-4, 1e-3, 1e-2]
    assert base.numel() * len(secondaries) >= _fused.PARALLEL_MIN * 2  # several workers
    outside = chain_with_row_stats(base, secondaries, ts, backend="fused")
    with torch.inference_mode():
        inside = chain_with_row_stats(base, secondaries, ts, backend="fused")
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))

"""SQuant's guarantees (CASE objective, Guo et al. 2022 Sec. 3.3): checked as properties."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import dfquant
from dfquant.errors import DfquantError
from dfquant.quantizer import minmax_params, to_grid
from dfquant.squant import rounding_error_sums, squant_round

TOL = 1e-4


def _case(seed, out, inp, k, bits, spread):
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    shape = (out, inp) if k == 0 else (out, inp, k, k)
    # in range, away from the clamp, so every guarantee applies
    x = qmin + 0.5 + torch.rand(shape, generator=g) * (qmax - qmin - 1) * spread
    return x, qmin, qmax


shapes = st.tuples(
    st.integers(0, 10_000), st.integers(1, 12), st.integers(1, 24), st.sampled_from([0, 1, 3, 5]), st.integers(2, 8), st.floats(0.05, 1.0)
)


def _is_floor_or_ceil(q, x, qmin, qmax):
    return bool(((q == torch.floor(x).clamp(qmin, qmax)) | (q == torch.ceil(x).clamp(qmin, qmax))).all())


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_kernel_level_sums_within_half(case):
    x, qmin, qmax = _case(*case)
    q = squant_round(x, qmin, qmax, kernel=True, channel=False)
    assert _is_floor_or_ceil(q, x, qmin, qmax)
    k_err, _ = rounding_error_sums(q, x)
    assert k_err <= 0.5 + TOL


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_channel_level_sums_within_half_kernels_within_one(case):
    x, qmin, qmax = _case(*case)
    q = squant_round(x, qmin, qmax, kernel=True, channel=True)
    assert _is_floor_or_ceil(q, x, qmin, qmax)
    assert q.min() >= qmin and q.max() <= qmax
    k_err, c_err = rounding_error_sums(q, x)
    assert c_err <= 0.5 + TOL
    assert k_err <= 1.0 + TOL


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_channel_only_sums_within_half(case):
    x, qmin, qmax = _case(*case)
    q = squant_round(x, qmin, qmax, kernel=False, channel=True)
    assert _is_floor_or_ceil(q, x, qmin, qmax)
    assert rounding_error_sums(q, x)[1] <= 0.5 + TOL


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_element_level_is_round_to_nearest(case):
    x, qmin, qmax = _case(*case)
    q = squant_round(x, qmin, qmax, kernel=False, channel=False)
    assert torch.equal(q, torch.clamp(torch.round(x), qmin, qmax))


def test_out_of_range_values_stay_in_range():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 10
    q = squant_round(x, -8, 7)
    assert q.min() >= -8 and q.max() <= 7
    assert _is_floor_or_ceil(q, x, -8, 7)


def test_kernel_and_channel_sums_beat_rtn_on_real_grid():
    torch.manual_seed(1)
    w = torch.randn(32, 16, 3, 3)
    qp = minmax_params(w, 4)
    x = to_grid(w, qp)
    rtn = torch.clamp(torch.round(x), qp.qmin, qp.qmax)
    sq = squant_round(x, qp.qmin, qp.qmax)
    assert rounding_error_sums(sq, x)[1] < rounding_error_sums(rtn, x)[1]
    # each element still moves by at most one step from its real value
    assert (sq - x).abs().max() < 1.0


def test_deterministic():
    x = torch.rand(16, 8, 3, 3) * 14 - 7
    assert torch.equal(squant_round(x, -8, 7), squant_round(x.clone(), -8, 7))


def test_public_signature():
    out = dfquant.squant_round(torch.rand(4, 3) * 6, 0, 7, kernel=True, channel=True)
    assert out.shape == (4, 3)


@pytest.mark.parametrize("bad", [torch.rand(5), torch.tensor(3.0)])
def test_bad_shape(bad):
    with pytest.raises(DfquantError, match="shape"):
        squant_round(bad, -8, 7)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 3, 3)])
@pytest.mark.parametrize("kernel,channel", [(False, False), (True, False), (False, True), (True, True)])
def test_non_finite_weights_are_refused_at_every_level(value, shape, kernel, channel):
    x = torch.rand(shape) * 10 - 5
    x.view(-1)[7] = value
    with pytest.raises(DfquantError, match="non-finite"):
        squant_round(x, -8, 7, kernel=kernel, channel=channel)


def test_bad_values():
    with pytest.raises(DfquantError, match="qmin < qmax"):
        squant_round(torch.rand(2, 2), 3, 3)


# --- Same codes as the implementation before it was made fast (tests/squant_reference.py) ---------

FLAGS = [(False, False), (True, False), (False, True), (True, True)]


def _values(g, shape, qmin, qmax, kind):
    """Grid-unit weights of one kind: inside the grid, beyond it (clamping), on or next to the .5
    rounding ties, on a coarse lattice (many exactly equal flip priorities), or mostly integers."""
    u = torch.rand(shape, generator=g)
    span = qmax - qmin
    if kind == "inside":
        return qmin + u * span
    if kind == "beyond":
        return qmin - 3 + u * (span + 6)
    base = torch.randint(qmin, qmax, shape, generator=g).float()
    if kind == "halves":  # exact .5 ties and their float neighbours
        nudge = torch.randint(-1, 2, shape, generator=g).float() * 2e-6
        return base + 0.5 + nudge * (torch.rand(shape, generator=g) < 0.5)
    if kind == "lattice":  # multiples of 1/8: |q - x| repeats within a kernel and a channel
        return base + torch.randint(0, 8, shape, generator=g).float() / 8
    if kind == "integers":
        return base + (torch.rand(shape, generator=g) < 0.2) * (u - 0.5)
    raise ValueError(kind)


SHAPES = [(6, 5, 3, 3), (4, 3, 1, 1), (8, 1, 3, 3), (5, 7), (3, 2, 5, 5), (2, 3, 1, 3), (16, 40, 3, 3),
          (24, 300), (9, 64, 1, 1), (3, 1, 7, 7), (40, 1100), (12, 129, 3, 3), (1, 1, 3, 3), (7, 1)]
KINDS = ["inside", "beyond", "halves", "lattice", "integers"]


@pytest.mark.parametrize("kind", KINDS)
def test_same_codes_as_reference(kind):
    from squant_reference import squant_round as reference

    g = torch.Generator().manual_seed(KINDS.index(kind))
    for shape in SHAPES:
        for bits in range(2, 9):
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            x = _values(g, shape, qmin, qmax, kind)
            for kernel, channel in FLAGS:
                got = squant_round(x, qmin, qmax, kernel=kernel, channel=channel)
                want = reference(x, qmin, qmax, kernel=kernel, channel=channel)
                assert torch.equal(got, want), (kind, shape, bits, kernel, channel)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 70), st.sampled_from([0, 1, 3, 5]), st.integers(2, 8),
       st.sampled_from(KINDS), st.sampled_from(FLAGS))
def test_same_codes_as_reference_hypothesis(seed, out, inp, k, bits, kind, flags):
    from squant_reference import squant_round as reference

    g = torch.Generator().manual_seed(seed)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = _values(g, (out, inp) if k == 0 else (out, inp, k, k), qmin, qmax, kind)
    kernel, channel = flags
    assert torch.equal(squant_round(x, qmin, qmax, kernel=kernel, channel=channel), reference(x, qmin, qmax, kernel=kernel, channel=channel))


def test_same_codes_as_reference_unsigned_and_float64():
    from squant_reference import squant_round as reference

    g = torch.Generator().manual_seed(7)
    x = (torch.rand(10, 6, 3, 3, generator=g) * 17 - 1).double()
    for kernel, channel in FLAGS:
        got = squant_round(x, 0, 15, kernel=kernel, channel=channel)
        assert got.dtype == torch.float64
        assert torch.equal(got, reference(x, 0, 15, kernel=kernel, channel=channel))


@pytest.mark.parametrize("rule", ["minmax", "lp"])
def test_same_codes_as_reference_on_resnet20(resnet20, rule):
    """Every conv/linear weight of the trained CIFAR ResNet-20 on its per-channel grid, 2..8 bits."""
    from dfquant.quantizer import weight_params
    from squant_reference import squant_round as reference

    weights = [m.weight.detach() for m in resnet20.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bit_range = range(2, 9) if rule == "minmax" else (3,)  # the Lp search is slow; it clips, so many off-grid values
    for w in weights:
        for bits in bit_range:
            qp = weight_params(w, bits, rule)
            x = to_grid(w, qp)
            for kernel, channel in FLAGS:
                got = squant_round(x, qp.qmin, qp.qmax, kernel=kernel, channel=channel)
                assert torch.equal(got, reference(x, qp.qmin, qp.qmax, kernel=kernel, channel=channel)), (tuple(w.shape), bits, kernel, channel)


def test_same_codes_as_reference_with_huge_values():
    """Weights far off the grid (kernel sums beyond 2**63, where the former int64 counts wrap)."""
    from squant_reference import squant_round as reference

    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 4, 3, 3, generator=g) * 15 - 7.5
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[2, 3] = 3e19, -2e20, 1e30
    for kernel, channel in FLAGS:
        assert torch.equal(squant_round(x, -8, 7, kernel=kernel, channel=channel), reference(x, -8, 7, kernel=kernel, channel=channel))


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_double_sums_are_the_whole_sums(threads):
    """The channel sums taken a block of rows at a time are bit for bit those of the whole tensor."""
    from dfquant.squant import _double_row_sums

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for rows, n in [(3, 5), (1025, 1024), (2049, 512), (7, 100_000), (2, 300_000)]:
            r = torch.randn(rows, n, generator=g) * torch.rand(rows, n, generator=g).pow(8) * 1e3  # many magnitudes
            assert torch.equal(_double_row_sums(r), r.double().sum(dim=1)), (rows, n)
    finally:
        torch.set_num_threads(before)

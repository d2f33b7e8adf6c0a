import pytest
import torch

from dfquant.errors import DfquantError
from dfquant.quantizer import (
    fake_quant,
    from_grid,
    minmax_params,
    params_from_range,
    qrange,
    quantize_tensor,
    rtn_round,
    to_grid,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_qrange(bits):
    assert qrange(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert qrange(bits, False) == (0, 2**bits - 1)


@pytest.mark.parametrize("bad", [1, 9, 0, -3, 4.0, "4", True])
def test_bits_out_of_range(bad):
    with pytest.raises(DfquantError):
        qrange(bad, True)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_minmax_round_trip_within_half_step(bits, per_channel):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 3
    qp = minmax_params(w, bits, per_channel=per_channel)
    q = quantize_tensor(w, qp)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    assert torch.equal(q, q.round())
    step = qp.scale.reshape(-1, 1, 1, 1) if per_channel else qp.scale
    # every value within half a step (plus the <= half step the min/max may lie off the grid ends)
    assert torch.all((from_grid(q, qp) - w).abs() <= step * 1.0 + 1e-6)
    assert torch.all((from_grid(q, qp) - w).abs().flatten(1).max(1).values <= (step.flatten() if per_channel else step) * 1.0 + 1e-6)


def test_per_channel_scales_follow_each_channel():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-10, 5, 9)]).reshape(2, 1, 3, 3)
    qp = minmax_params(w, 4)
    assert qp.scale.shape == (2,)
    assert torch.allclose(qp.scale, torch.tensor([2 / 15, 15 / 15]))
    grid = to_grid(w, qp)
    assert grid.flatten(1).min(1).values.sub(qp.qmin).abs().max() <= 0.5 + 1e-6
    assert grid.flatten(1).max(1).values.sub(qp.qmax).abs().max() <= 0.5 + 1e-6


def test_unsigned_activation_params_cover_range():
    qp = params_from_range(torch.tensor(0.0), torch.tensor(6.0), 4, signed=False)
    x = torch.linspace(0, 6, 101)
    q = quantize_tensor(x, qp)
    assert q.min() == 0 and q.max() == 15
    assert (from_grid(q, qp) - x).abs().max() <= qp.scale / 2 + 1e-6
    with pytest.raises(DfquantError):
        params_from_range(torch.tensor(1.0), torch.tensor(0.0), 4, signed=False)


def test_fake_quant_straight_through_gradient():
    qp = params_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, signed=True)
    x = torch.linspace(-0.87, 0.91, 9, requires_grad=True)  # no value on a rounding tie
    y = fake_quant(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax, ste=True)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))
    assert torch.allclose(y, from_grid(quantize_tensor(x.detach(), qp), qp))
    assert torch.equal(fake_quant(x.detach(), qp.scale, qp.zero_point, qp.qmin, qp.qmax), from_grid(quantize_tensor(x.detach(), qp), qp))


def test_rtn_round_clamps():
    x = torch.tensor([-9.7, -0.4, 0.6, 7.49, 12.0])
    assert rtn_round(x, -8, 7).tolist() == [-8.0, -0.0, 1.0, 7.0, 7.0]


def _lp_error(w, qp, p=2.4):
    per = w.reshape(w.shape[0], -1)
    return (from_grid(quantize_tensor(w, qp), qp) - w).abs().pow(p).reshape(per.shape).mean(dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lp_search_never_worse_than_minmax_and_stays_inside_the_range(bits):
    from dfquant.quantizer import lp_params

    torch.manual_seed(bits)
    w = torch.randn(12, 6, 3, 3) ** 3  # heavy tails: clipping pays off at low bits
    lp, mm = lp_params(w, bits), minmax_params(w, bits)
    assert torch.all(_lp_error(w, lp) <= _lp_error(w, mm) + 1e-12)  # ratio 1.0 is a candidate
    assert torch.all(lp.scale <= mm.scale + 1e-7)  # only ever clips
    if bits == 2:
        assert _lp_error(w, lp).sum() < 0.9 * _lp_error(w, mm).sum()


def test_weight_params_rules():
    from dfquant.quantizer import weight_params

    w = torch.randn(4, 3, 3, 3)
    assert torch.equal(weight_params(w, 4, "minmax").scale, minmax_params(w, 4).scale)
    assert weight_params(w, 4, "lp", per_channel=False).scale.dim() == 0
    with pytest.raises(DfquantError, match="weight range"):
        weight_params(w, 4, "percentile")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_symmetric_grid_has_zero_point_zero_and_rounds_every_weight_within_half_a_step(bits, per_channel):
    from dfquant.quantizer import weight_params

    torch.manual_seed(bits)
    w = torch.randn(6, 4, 3, 3) * torch.rand(6, 1, 1, 1) + 0.3 * torch.rand(6, 1, 1, 1)  # off-centre channels
    qp = weight_params(w, bits, "symmetric", per_channel=per_channel)
    top = 2 ** (bits - 1) - 1
    assert torch.equal(qp.zero_point, torch.zeros_like(qp.scale)) and qp.scale.dim() == (1 if per_channel else 0)
    codes = quantize_tensor(w, qp)
    assert int(codes.min()) >= -top and int(codes.max()) <= top  # the restricted range: -2^(b-1) unused
    flat = codes.abs().reshape(6, -1)
    assert (flat.amax(dim=1) == top).all() if per_channel else int(flat.max()) == top  # max |w| lands on the end
    step = qp.scale.reshape(-1, 1, 1, 1) if per_channel else qp.scale
    assert ((from_grid(codes, qp) - w).abs() <= step / 2 * (1 + 1e-5)).all()


# ---- DF-MPC's per-tensor grids: TWN (2 bits) and DoReFa (Eq. 6) ----

_HAND = torch.tensor([[0.9, -0.1], [0.5, -0.6]])  # mean |W| 0.525, TWN threshold 0.3675


def test_twn_hand_example_threshold_scale_and_codes():
    from dfquant.quantizer import grid_codes, twn_params

    qp = twn_params(_HAND)
    codes = grid_codes(_HAND, qp, "twn")
    assert codes.tolist() == [[1, 0], [1, -1]]  # -0.1 is under 0.3675
    assert torch.isclose(qp.scale, torch.tensor(2.0 / 3.0))  # (0.9 + 0.5 + 0.6) / 3
    assert qp.zero_point.item() == 0 and qp.bits == 2 and qp.scale.dim() == 0
    assert torch.allclose(from_grid(codes, qp), torch.tensor([[2 / 3, 0.0], [2 / 3, -2 / 3]]))


def test_twn_codes_are_ternary_and_do_not_depend_on_the_weight_scale():
    from dfquant.quantizer import grid_codes, twn_params

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    codes = grid_codes(w, twn_params(w), "twn")
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(codes, grid_codes(w * 4.0, twn_params(w * 4.0), "twn"))
    assert torch.isclose(twn_params(w * 4.0).scale, 4.0 * twn_params(w).scale)


def test_twn_of_an_all_zero_weight_is_finite_and_zero():
    from dfquant.quantizer import grid_codes, twn_params

    w = torch.zeros(3, 2, 3, 3)
    qp = twn_params(w)
    codes = grid_codes(w, qp, "twn")
    assert torch.isfinite(qp.scale) and qp.scale > 0
    assert torch.equal(from_grid(codes, qp), w)


def test_dorefa_hand_example_matches_eq6_with_a_half_integer_zero_point():
    from dfquant.quantizer import dorefa_params, grid_codes

    qp = dorefa_params(_HAND, 3)
    codes = grid_codes(_HAND, qp, "dorefa")
    # Eq. 6: i = round(7 (w / 1.8 + 1/2)) = [[7, 3], [5, 1]]; signed code i - 4; value 0.9 (2 i / 7 - 1)
    assert codes.tolist() == [[3, -1], [1, -3]]
    assert qp.zero_point.item() == -0.5 and torch.isclose(qp.scale, torch.tensor(1.8 / 7))
    want = 0.9 * (2 * torch.tensor([[7.0, 3.0], [5.0, 1.0]]) / 7 - 1)
    assert torch.allclose(from_grid(codes, qp), want)


@pytest.mark.parametrize("bits", range(2, 9))
def test_dorefa_equals_eq6_levels_cover_plus_minus_max_and_none_is_zero(bits):
    from dfquant.quantizer import dorefa_params, grid_codes

    torch.manual_seed(bits)
    w = torch.randn(6, 5, 3, 3).double().float()
    qp = dorefa_params(w, bits)
    codes = grid_codes(w, qp, "dorefa")
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax and torch.equal(codes, codes.round())
    n, m = 2**bits - 1, w.abs().max().double()
    eq6 = m * (2 / n * torch.round(n * (w.double() / (2 * m) + 0.5)) - 1)
    assert torch.allclose(from_grid(codes, qp).double(), eq6, atol=1e-6)
    levels = from_grid(torch.arange(qp.qmin, qp.qmax + 1), qp)
    assert torch.allclose(levels[[0, -1]], torch.stack([-m, m]).float()) and not torch.any(levels == 0)
    assert torch.allclose(levels, -levels.flip(0))  # symmetric


def test_dorefa_of_an_all_zero_weight_is_finite():
    from dfquant.quantizer import dorefa_params, grid_codes

    w = torch.zeros(2, 3)
    qp = dorefa_params(w, 4)
    assert torch.isfinite(from_grid(grid_codes(w, qp, "dorefa"), qp)).all()


def test_squant_on_the_per_tensor_grids_keeps_their_code_sets():
    from dfquant.quantizer import grid_codes, grid_params
    from dfquant.squant import squant_round

    torch.manual_seed(1)
    w = torch.randn(8, 6, 3, 3)
    twn = grid_codes(w, grid_params(w, 2, "twn"), "twn", squant_round)
    assert set(twn.unique().tolist()) <= {-1.0, 0.0, 1.0}
    qp = grid_params(w, 3, "dorefa")
    sq = grid_codes(w, qp, "dorefa", squant_round)
    assert sq.min() >= -4 and sq.max() <= 3
    d = (sq - to_grid(w, qp)).reshape(8, -1).sum(1).abs()
    assert torch.all(d <= 0.5 + 1e-4)  # SQuant's channel bound, in DoReFa's grid units


def test_a_quantized_conv_on_the_dorefa_grid_computes_with_eq6_values():
    from dfquant.qmodules import QuantConv2d
    from dfquant.quantizer import dorefa_params, grid_codes

    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    qp = dorefa_params(conv.weight, 3)
    codes = grid_codes(conv.weight, qp, "dorefa")
    q = QuantConv2d(conv, codes, qp)
    assert q.weight_int.dtype == torch.int8
    assert torch.allclose(q.weight, from_grid(codes, qp))


def test_grid_params_refuses_twn_above_two_bits_and_unknown_grids():
    from dfquant.quantizer import grid_params

    w = torch.randn(4, 3)
    with pytest.raises(DfquantError, match="w_grid") as e:
        grid_params(w, 4, "twn")
    assert e.value.param == "w_grid"
    with pytest.raises(DfquantError, match="unknown w_grid"):
        grid_params(w, 4, "binary")

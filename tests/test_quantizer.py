import pytest
import torch

from dfquant.errors import DfquantError
from dfquant.quantizer import fake_quant, from_grid, minmax_params, params_from_range, qrange, quantize_tensor, rtn_round, to_grid


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

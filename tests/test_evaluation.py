"""Evaluation: per-image predictions and logit errors, the exact McNemar test and the sign test of two models on the same images."""
import math

import pytest
import torch

import dfquant
from dfquant.errors import DfquantError


def test_predictions_match_the_accuracy(digits):
    model, (x, y) = digits
    q, _ = dfquant.quantize(model, "rtn", 3, 3)
    ev = dfquant.evaluate(q, (x, y), batch_size=64, predictions=True)
    assert len(ev["predictions"]) == len(ev["correct"]) == y.numel()
    assert ev["correct"] == [p == int(t) for p, t in zip(ev["predictions"], y)]
    assert ev["predictions"] == q.eval()(x).argmax(dim=1).tolist()
    assert 100.0 * sum(ev["correct"]) / y.numel() == pytest.approx(ev["top1"])
    assert "predictions" not in dfquant.evaluate(q, (x, y))


def test_paired_comparison_counts_and_exact_p_value():
    a = [True] * 10 + [False] * 1 + [True] * 5 + [False] * 4
    b = [False] * 10 + [True] * 1 + [True] * 5 + [False] * 4
    r = dfquant.paired_comparison(a, b)
    assert (r["n"], r["a_only"], r["b_only"]) == (20, 10, 1)
    # two-sided exact binomial: 2 * P(Bin(11, 1/2) <= 1) = 2 * 12 / 2048
    assert r["p_value"] == pytest.approx(24 / 2048)
    assert r["diff_points"] == pytest.approx(100 * 9 / 20)
    swapped = dfquant.paired_comparison(b, a)
    assert (swapped["a_only"], swapped["b_only"], swapped["p_value"]) == (1, 10, r["p_value"])


def test_paired_comparison_without_discordant_images_is_not_significant():
    same = [True, False, True]
    assert dfquant.paired_comparison(same, same)["p_value"] == 1.0
    # a balanced split is the least significant outcome
    assert dfquant.paired_comparison([True, False], [False, True])["p_value"] == 1.0


def test_paired_comparison_matches_a_binomial_sum():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(500, generator=g) < 0.9).tolist()
    b = (torch.rand(500, generator=g) < 0.85).tolist()
    r = dfquant.paired_comparison(a, b)
    n, k = r["a_only"] + r["b_only"], min(r["a_only"], r["b_only"])
    expected = min(1.0, 2 * sum(math.comb(n, i) * 0.5**n for i in range(k + 1)))
    assert r["p_value"] == pytest.approx(expected)
    assert 0.0 < r["p_value"] < 1.0


def test_paired_comparison_on_a_large_test_set():
    # more than 1023 discordant images (an ImageNet-sized evaluation) must not overflow
    r = dfquant.paired_comparison([True] * 1600 + [False] * 1400, [False] * 1600 + [True] * 1400)
    assert (r["a_only"], r["b_only"]) == (1600, 1400)
    assert 0.0 < r["p_value"] < 1e-3
    assert dfquant.paired_comparison([True] * 1500 + [False] * 1500, [False] * 1500 + [True] * 1500)["p_value"] == 1.0


def test_paired_comparison_needs_the_same_images():
    with pytest.raises(DfquantError, match="same images"):
        dfquant.paired_comparison([True, False], [True])


def test_per_image_logit_errors_average_to_the_logit_mse(digits):
    model, (x, y) = digits
    q, _ = dfquant.quantize(model, "rtn", 3, 3)
    ev = dfquant.evaluate(q, (x, y), batch_size=64, reference=model, predictions=True)
    errs = ev["logit_sq_err"]
    assert len(errs) == y.numel() and min(errs) >= 0.0
    assert sum(errs) / len(errs) == pytest.approx(ev["logit_mse"], rel=1e-6)
    with torch.no_grad():
        first = float(((q(x[:1]) - model(x[:1])) ** 2).mean())
    assert errs[0] == pytest.approx(first, rel=1e-5)
    assert "logit_sq_err" not in dfquant.evaluate(q, (x, y), predictions=True)  # no reference, no errors


def test_paired_error_comparison_sign_test():
    a = [0.1, 0.2, 0.3, 0.5, 1.0, 2.0]
    b = [0.2, 0.3, 0.3, 0.4, 2.0, 3.0]  # A lower on 4 images, B on 1, one tie
    r = dfquant.paired_error_comparison(a, b)
    assert (r["a_closer"], r["b_closer"], r["ties"], r["n"]) == (4, 1, 1, 6)
    assert r["p_value"] == pytest.approx(2 * (1 + 5) / 2**5)  # P(Bin(5, 1/2) <= 1), two-sided
    assert r["median_diff"] == pytest.approx(-0.1)
    swapped = dfquant.paired_error_comparison(b, a)
    assert (swapped["a_closer"], swapped["b_closer"], swapped["p_value"]) == (1, 4, r["p_value"])


def test_paired_error_comparison_resolves_a_consistent_small_gain():
    # B is a little worse on 60 of 100 images and a little better on 40: p of a 60:40 split
    a = [1.0] * 100
    b = [1.01] * 60 + [0.99] * 40
    r = dfquant.paired_error_comparison(a, b)
    expected = 2 * sum(math.comb(100, k) for k in range(41)) / 2**100
    assert (r["a_closer"], r["b_closer"]) == (60, 40) and r["p_value"] == pytest.approx(expected)
    assert dfquant.paired_error_comparison(a, a)["p_value"] == 1.0


def test_paired_error_comparison_bad_input():
    with pytest.raises(DfquantError, match="same images"):
        dfquant.paired_error_comparison([0.1, 0.2], [0.1])
    with pytest.raises(DfquantError, match="NaN"):
        dfquant.paired_error_comparison([float("nan")], [0.1])


def test_sign_test_p_is_the_exact_two_sided_binomial():
    from dfquant.evaluation import sign_test_p

    assert sign_test_p(8, 0) == sign_test_p(0, 8) == 2 / 2**8  # eight of eight: p = 2 * 0.5^8
    assert sign_test_p(7, 1) == pytest.approx(2 * 9 / 2**8)  # P(X <= 1) = (1 + 8) / 256, doubled
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0


def test_labels_outside_the_model_outputs_are_refused(digits):
    model, (x, y) = digits
    with pytest.raises(DfquantError, match=r"labels must be class indices in 0..9 \(the model has 10 outputs\), found 10..19"):
        dfquant.evaluate(model, (x, y + 10))
    with pytest.raises(DfquantError, match="labels must be integer class indices, got float32"):
        dfquant.evaluate(model, (x, y.float()))
    with pytest.raises(DfquantError, match="labels must be class indices in 0..9"):
        dfquant.evaluate(model, [(x[:8], torch.full((8,), -1))])  # an iterable of batches is checked too


def test_numpy_arrays_are_accepted(digits):
    model, (x, y) = digits
    assert dfquant.evaluate(model, (x.numpy(), y.numpy())) == dfquant.evaluate(model, (x, y))


def test_a_reference_of_another_shape_is_refused(digits):
    model, (x, y) = digits
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with pytest.raises(DfquantError, match=r"the reference model's output shape \(\d+, 3\) differs from the model's \(\d+, 10\)"):
        dfquant.evaluate(model, (x, y), reference=other)
    wrong_input = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(5, 10))
    with pytest.raises(DfquantError, match="the reference model cannot run on these inputs of shape"):
        dfquant.evaluate(model, (x, y), reference=wrong_input)


def test_a_model_that_returns_a_tuple_is_a_clear_error():
    class Two(torch.nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(DfquantError, match="got a tuple"):
        dfquant.evaluate(Two(), (torch.randn(3, 4), torch.zeros(3, dtype=torch.long)))


def test_non_finite_outputs_are_refused_and_the_callers_modes_are_kept():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    net[1].eval()  # a mixed-mode model comes back mixed as it was
    data = (torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    dfquant.evaluate(net, data)
    assert net.training and net[0].training and not net[1].training
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(DfquantError, match="NaN or inf"):
        dfquant.evaluate(net, data)


def test_reference_logits_give_the_same_comparison_as_the_reference_model(digits):
    model, (x, y) = digits
    q, _ = dfquant.quantize(model, "rtn", 3, 3)
    logits = dfquant.reference_logits(model, (x, y), batch_size=64)
    assert logits.shape == (len(y), 10)
    by_model = dfquant.evaluate(q, (x, y), batch_size=64, reference=model, predictions=True)
    by_logits = dfquant.evaluate(q, (x, y), batch_size=64, reference=logits, predictions=True)
    assert by_model == by_logits
    with pytest.raises(dfquant.DfquantError, match="logits of 20 images, the data has 10"):
        dfquant.evaluate(q, (x[:10], y[:10]), reference=logits[:20])

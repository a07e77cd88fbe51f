"""The judge of generated slices: classification metrics, the small CNN, and the conditional checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from brainfusion.evaluation.classifier import load_classifier, predict, save_classifier, train_classifier, train_regressor
from brainfusion.evaluation.conditional_checks import check_conditional, conditional_table, resampling_generator
from brainfusion.errors import BrainfusionError
from brainfusion.evaluation.evaluate import EvalConfig
from brainfusion.evaluation.metrics.classification import balanced_accuracy, classification_scores, confusion_matrix, macro_f1

FAST = dict(resolution=16, channels=(8, 16), steps=60, batch_size=32)


def squares(n: int, levels: tuple[int, ...], seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n images per class: a noisy square of class brightness `levels[c]`, random size and place, black background."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, level in enumerate(levels):
        for _ in range(n):
            img = np.zeros((size, size), np.uint8)
            side = int(rng.integers(size // 3, size // 2 + 1))
            y, x = rng.integers(0, size - side, 2)
            img[y : y + side, x : x + side] = np.clip(rng.normal(level, 10, (side, side)), 0, 255)
            images.append(img)
            labels.append(c)
    return np.stack(images), np.array(labels)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([0, 1, 1, 1, 2, 0])


def test_metrics_match_hand_computed_values():
    # rows = truth: class 0 → (0, 1), class 1 → (1, 1), class 2 → (2, 0)
    assert confusion_matrix(Y_TRUE, Y_PRED, 4).tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # F1 per class: 0 → P 1/2 R 1/2 → 0.5; 1 → P 2/3 R 1 → 0.8; 2 → P 1 R 1/2 → 2/3
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    scores = classification_scores(Y_TRUE, Y_PRED, 4)
    assert scores["recall_per_class"] == [0.5, 1.0, 0.5, None]
    assert scores["support_per_class"] == [2, 2, 2, 0] and scores["accuracy"] == pytest.approx(4 / 6)


def test_metrics_match_torchmetrics():
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    tt, tp = torch.from_numpy(t), torch.from_numpy(p)
    assert balanced_accuracy(t, p) == pytest.approx(multiclass_accuracy(tp, tt, 4, average="macro").item(), abs=1e-6)
    assert macro_f1(t, p) == pytest.approx(multiclass_f1_score(tp, tt, 4, average="macro").item(), abs=1e-6)


@pytest.mark.parametrize("bad", [np.array([0.2, 0.8]), np.array([[0, 1]]), np.array([], dtype=int)])
def test_metrics_refuse_non_labels(bad):
    with pytest.raises(BrainfusionError):
        balanced_accuracy(bad, bad)
    with pytest.raises(BrainfusionError, match="0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), 2)


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------


def test_classifier_learns_bright_vs_dark_squares():
    x, y = squares(40, (70, 200), seed=0)
    model = train_classifier(x, y, 2, seed=0, **FAST)
    tx, ty = squares(50, (70, 200), seed=1)
    probs = predict(model, tx)
    assert probs.shape == (100, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.mean(probs.argmax(1) == ty) >= 0.95


def test_classifier_is_deterministic_and_leaves_global_rng_alone():
    x, y = squares(12, (70, 200, 130), seed=2)
    x, y = x[:-8], y[:-8]  # imbalanced: 12, 12, 4
    before = torch.get_rng_state()
    a = train_classifier(x, y, 3, seed=5, **{**FAST, "steps": 8})
    assert torch.equal(torch.get_rng_state(), before)
    b = train_classifier(x, y, 3, seed=5, **{**FAST, "steps": 8})
    c = train_classifier(x, y, 3, seed=6, **{**FAST, "steps": 8})
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)
    assert a.info["class_counts"] == [12, 12, 4]


def test_regressor_learns_brightness_and_classifier_round_trips(tmp_path):
    x, y = squares(20, (40, 90, 140, 190, 240), seed=3)
    model = train_regressor(x, y / 4.0, seed=0, **{**FAST, "steps": 80})
    values = predict(model, x)
    assert values.shape == (100,) and np.corrcoef(values, y)[0, 1] > 0.9
    clf = train_classifier(x, y, 5, seed=0, **{**FAST, "steps": 4})
    back = load_classifier(save_classifier(clf, tmp_path / "clf.safetensors"))
    assert np.array_equal(predict(back, x), predict(clf, x)) and back.config == clf.config


def test_classifier_refuses_bad_input(tmp_path):
    x, y = squares(4, (70, 200), seed=0)
    with pytest.raises(BrainfusionError, match="outside 0..1"):
        train_classifier(x, y + 1, 2)
    with pytest.raises(BrainfusionError, match="balance"):
        train_classifier(x, y, 2, balance="oversample")
    with pytest.raises(BrainfusionError, match="unknown classifier setting"):
        train_classifier(x, y, 2, epochs=3)
    with pytest.raises(BrainfusionError, match="in \\[0, 1\\]"):
        train_regressor(x, y * 2.0)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BrainfusionError, match="not a classifier"):
        load_classifier(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------------------------
# Conditional checks with stand-in generators
# ----------------------------------------------------------------------------------------------


def test_conditional_checks_with_fake_generators():
    levels = (60, 140, 230)
    train_x, train_y = squares(30, levels, seed=0)
    held_x, held_y = squares(12, levels, seed=1)
    model = train_classifier(train_x, train_y, 3, seed=0, **{**FAST, "steps": 150})  # 60 steps: 67 %, 150: 100 %
    right = resampling_generator(held_x, held_y, seed=0)
    wrong = lambda n, c: right(n, (c + 1) % 3)  # noqa: E731 - always the next class
    report = check_conditional({"right": right, "wrong": wrong}, model, held_x, held_y, ["dark", "mid", "bright"],
                               n_per_class=16, reference=train_x, reference_labels=train_y,
                               eval_config=EvalConfig(diversity_pairs=16, progress=False))  # 500 pairs: 3 s of MS-SSIM
    own = report["classifier_heldout"]["balanced_accuracy"]
    assert own >= 0.95
    assert report["generators"]["right"]["mean_hit_rate"] >= 0.9
    assert report["generators"]["wrong"]["mean_hit_rate"] <= 0.1
    for r, w, f in zip(report["generators"]["right"]["per_class"], report["generators"]["wrong"]["per_class"], report["reference_floor"]):
        assert r["n_fd"] == f["n_fd"] == 16 and r["FD_domain"] < w["FD_domain"]
        assert sum(r["classified_as"]) == 16
    table = conditional_table(report)
    assert "| wrong | bright |" in table and "mean over classes" in table


def test_conditional_checks_refuse_a_generator_that_miscounts():
    x, y = squares(6, (60, 230), seed=0)
    model = train_classifier(x, y, 2, seed=0, **{**FAST, "steps": 2})
    with pytest.raises(BrainfusionError, match="not the 4 asked for"):
        check_conditional(lambda n, c: x[: n - 1], model, x, y, ["a", "b"], n_per_class=4)


# ----------------------------------------------------------------------------------------------
# The augmentation benchmark, end to end on a tiny class-folder set
# ----------------------------------------------------------------------------------------------


def test_bench_augment_runs_end_to_end(tmp_path):
    import sys
    from pathlib import Path

    from conftest import brain_slice, write_png

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_augment

    for name, count, value in (("Bright", 12, 220), ("Dark", 6, 90)):
        for i in range(count):
            write_png(tmp_path / "data" / name / f"slice{i}.png", brain_slice(i, 16, 16, value=value))
    work = tmp_path / "work"
    bench_augment.main(["--data", str(tmp_path / "data"), "--work", str(work), "--generator", "real-copies", "--size", "16",
                        "--arms", "real,real-sampler,balanced,generated", "--seeds", "0,1", "--steps", "3",
                        "--holdout", "0.34", "--checks", "3"])
    results = json.loads((work / "results.json").read_text())
    assert results["class_names"] == ["Bright", "Dark"] and results["heldout_class_counts"] == [4, 2]
    assert results["arms"]["balanced"]["train_class_counts"] == [8, 8]
    assert results["arms"]["generated"]["train_class_counts"] == [8, 8]
    assert len(results["arms"]["real"]["runs"]) == 2
    assert (work / "confusion.png").stat().st_size > 0 and "real copies only" in (work / "augment.md").read_text()
    assert "mean over classes" in (work / "conditional.md").read_text()

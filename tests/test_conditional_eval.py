"""`brainfusion evaluate --conditional` (issue 12): a conditional checkpoint judged per class and slice level at
several guidance scales, against judges trained on real slices; and its refusals of bad input. Tiny (16 px, 2 steps)."""

from __future__ import annotations

import json

import pytest
from conftest import make_class_slices

TRAIN = ["--image-size", "16", "--patch-size", "1", "--base-channels", "8", "--batch-size", "4", "--max-steps", "2",
         "--checkpoint-every", "2", "--log-every", "1", "--sample-every", "0", "--precision", "fp32"]
CHECKS = ["--n", "0", "--conditional", "--image-size", "32", "--sampler", "dpm++sde", "--steps", "2", "--judge-steps", "5",
          "--batch-size", "8", "--precision", "fp32"]
CLASSES = {"Bright": 220, "Dark": 90}


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A class- and level-conditional run trained 2 steps on class folders, its training set and a held-out set."""
    from brainfusion.cli import main

    tmp = tmp_path_factory.mktemp("conditional_eval")
    train, heldout = make_class_slices(tmp / "train", (0, 1)), make_class_slices(tmp / "heldout", (9,))
    run = tmp / "run"
    assert main(["--quiet", "train", "--data", str(train), "--out-dir", str(run), "--labels", "folders", "--slice-level", *TRAIN]) == 0
    return run, train, heldout


def test_evaluate_conditional_writes_one_generator_per_guidance_scale(cli, tmp_path, conditional_run):
    run, train, heldout = conditional_run
    out = tmp_path / "eval"
    status, stdout, err = cli("evaluate", "--checkpoint", run, "--real", heldout, "--train", train, "--out", out,
                              "--guidance", "0,1", "--n-per-class", "4", *CHECKS)
    assert status == 0, err
    report = json.loads((out / "conditional.json").read_text())
    classes = report["classes"]
    assert report["class_column"] == "class" and classes["class_names"] == ["Bright", "Dark"]
    assert list(classes["generators"]) == ["guidance 0", "guidance 1"]
    for result in classes["generators"].values():
        assert [row["class"] for row in result["per_class"]] == ["Bright", "Dark"]
        for row in result["per_class"]:
            assert 0 <= row["hit_rate"] <= 1 and row["n"] == 4 and sum(row["classified_as"]) == 4
    held = classes["classifier_heldout"]
    assert 0 <= held["balanced_accuracy"] <= 1 and len(held["recall_per_class"]) == 2
    assert classes["classifier_reference"] is not None and len(classes["reference_floor"]) == 2
    level = report["level"]  # the model has the slice-level input too
    assert list(level["generators"]) == ["guidance 0", "guidance 1"] and level["regressor_heldout_mae"] >= 0
    assert all(0 <= e <= 1 for g in level["generators"].values() for e in g["per_level"].values())
    table = (out / "conditional.md").read_text()
    assert "| guidance 1 | Dark |" in table and "mean over classes" in table and "regressor on held-out real" in table
    assert "| guidance 0 | Bright |" in stdout and not (out / "metrics.json").exists()  # --n 0: the conditional checks alone
    status, _, err = cli("export", run, "--out", tmp_path / "export", "--metrics", out / "metrics.json")
    assert status == 0, err
    card = (tmp_path / "export" / "README.md").read_text()  # the card shows the checks found beside --metrics
    assert "Does it make what it is asked for?" in card and "| guidance 1 | Dark |" in card


@pytest.mark.parametrize("case, extra, names", [
    ("unconditional", [], ["is an unconditional model", "--labels (condition.labels)"]),
    ("class missing", [], ["has no slice of class 'Dark'", "Bright, Dark"]),
    ("unknown class", [], ["Grey", "which the model does not know"]),
    ("no train", [], ["--train"]),
    ("table for folders", ["--real-labels", "labels.csv"], ["--real-labels labels.csv", "class folders"]),
    ("bad guidance", ["--guidance", "1,x"], ["--guidance '1,x'", "0,1,2"]),
    ("one per class", ["--n-per-class", "1"], ["--n-per-class 1"]),
    ("column", ["--class-column", "grade"], ["--class-column grade", "choose one of class"]),
])
def test_evaluate_conditional_refuses_bad_input(case, extra, names, assert_user_error, tmp_path, conditional_run, tiny_checkpoint):
    run, train, heldout = conditional_run
    if case == "unconditional":
        run = tiny_checkpoint
    elif case == "class missing":
        heldout = make_class_slices(tmp_path / "bright_only", (9,), {"Bright": 220})
    elif case == "unknown class":
        heldout = make_class_slices(tmp_path / "grey", (9,), {**CLASSES, "Grey": 150})
    args = ["evaluate", "--checkpoint", run, "--real", heldout, "--out", tmp_path / "eval", *CHECKS, *extra]
    assert_user_error(args if case == "no train" else [*args, "--train", train], *names)

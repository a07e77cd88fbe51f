"""Conditional generation (issue 12): labels from class folders, tables and slice positions, the
vocabulary saved with the run, condition embeddings, label dropout, classifier-free guidance with
every sampler, bitwise resume of a conditional run, and the command line. All tiny (16–32 px)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from brainfusion.checkpoint import load_checkpoint
from brainfusion.data.conditions import drop_labels, encode_request, label_slices, slice_levels
from brainfusion.config import ModelConfig, RunConfig
from brainfusion.data.slices import BatchStream, load_slices
from brainfusion.diffusion.process import classifier_free_guidance
from brainfusion.errors import BrainfusionError
from brainfusion.models.unet import UNet, count_parameters
from brainfusion.diffusion.pipeline import Pipeline
from brainfusion.seeding import seeded_generator

TRAIN = ["--image-size", "16", "--patch-size", "1", "--base-channels", "8", "--batch-size", "4", "--checkpoint-every", "2",
         "--log-every", "1", "--sample-every", "0", "--precision", "fp32"]


@pytest.fixture
def class_folders(tmp_path, brain_png, png_writer):
    """3 slices in each of the folders Mild/, Moderate/ and None/ (the Kaggle layout), 16 px."""
    root = tmp_path / "classes"
    for c, name in enumerate(("Mild", "Moderate", "None")):
        for k in range(3):
            png_writer(root / name / f"img{k}.png", brain_png(10 * c + k, 16, 16))
    return root


@pytest.fixture
def oasis_with_table(tmp_path, make_oasis_root):
    """The OASIS layout (10 train+test subjects of one slice each, case_NNN_slice_K) and a subject table."""
    root = make_oasis_root(tmp_path / "oasis", n_train=6, n_test=4, n_validate=2, size=16)
    rows = ["subject,CDR,Age"] + [f"case_{i:03d},{(0, 0.5, 1)[i % 3]},{60 + i}" for i in range(1, 13)]
    table = tmp_path / "subjects.csv"
    table.write_text("\n".join(rows) + "\n")
    return root, table


def _config(data, **condition) -> RunConfig:
    config = RunConfig()
    config.data.path, config.data.image_size = str(data), 16
    config.model.patch_size = 1
    config.train.max_steps = 1
    for key, value in condition.items():
        setattr(config.condition, key, value)
    config.validate()
    return config


def _labelled(config):
    return label_slices(config, load_slices(config.data, progress=False))


def test_labels_from_class_folders(class_folders):
    config = _config(class_folders, labels="folders")
    images, cond = _labelled(config)
    assert config.condition.classes == {"class": ("Mild", "Moderate", "None")}
    assert config.model.class_counts == (3,) and config.model.continuous_inputs == 0
    assert images.shape == (9, 16, 16) and cond.shape == (9, 1)
    assert cond[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted files: Mild/*, Moderate/*, None/*


def test_labels_from_a_table_matched_by_subject_and_normalised(oasis_with_table):
    root, table = oasis_with_table
    config = _config(root, labels=str(table), label_columns=("CDR",), continuous_columns=("Age",))
    slices = load_slices(config.data, progress=False)
    images, cond = label_slices(config, slices)
    cc = config.condition
    assert cc.classes == {"CDR": ("0", "0.5", "1")}  # numbers in numeric order
    ages = np.array([60 + int(s.split("case_")[1][:3]) for s in slices.sources], dtype=float)
    assert cc.stats["Age"] == pytest.approx((ages.mean(), ages.std()))
    assert np.allclose(cond[:, 1], (ages - ages.mean()) / ages.std(), atol=1e-6)
    assert [cc.classes["CDR"][int(i)] for i in cond[:, 0]] == [str((0, 0.5, 1)[int(s.split("case_")[1][:3]) % 3]) for s in slices.sources]
    # the vocabulary is part of the saved config and survives a JSON round trip in input order
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict(), sort_keys=True)))
    again.validate()
    assert again.condition == cc and again.model == config.model


def test_tsv_tables_match_relative_paths_and_name_their_key_column(tmp_path, class_folders):
    table = tmp_path / "labels.tsv"
    table.write_text("grade\tpath\n" + "".join(f"{'hi' if c == 'Mild' else 'lo'}\t{c}/img{k}.png\n"
                                                for c in ("Mild", "Moderate", "None") for k in range(3)))
    config = _config(class_folders, labels=str(table), label_columns=("grade",), key_column="path")
    _images, cond = _labelled(config)
    assert config.condition.classes == {"grade": ("hi", "lo")} and cond[:, 0].tolist() == [0] * 3 + [1] * 6


@pytest.mark.parametrize("problem, names", [
    ("empty", ["Moderate/img1.png", "'grade'"]),
    ("no_row", ["None/img2.png", "no row"]),
    ("not_a_number", ["Mild/img0.png", "'age'", "'old'"]),
    ("no_column", ["'weight'", "labels.csv"]),
])
def test_bad_labels_are_refused_naming_the_file_and_the_column(problem, names, tmp_path, class_folders, cli):
    rows = {f"{c}/img{k}.png": ["x", "70"] for c in ("Mild", "Moderate", "None") for k in range(3)}
    columns = "grade"
    if problem == "empty":
        rows["Moderate/img1.png"][0] = ""
    elif problem == "no_row":
        del rows["None/img2.png"]
    elif problem == "not_a_number":
        rows["Mild/img0.png"][1] = "old"
    else:
        columns = "weight"
    table = tmp_path / "labels.csv"
    table.write_text("file,grade,age\n" + "".join(f"{k},{v[0]},{v[1]}\n" for k, v in rows.items()))
    status, _out, err = cli("train", "--data", class_folders, "--out-dir", tmp_path / "run", "--max-steps", "1", *TRAIN,
                            "--labels", table, "--label-columns", columns, "--continuous-columns", "age")
    lines = [line for line in err.splitlines() if line.startswith("brainfusion: error:")]
    assert status == 2 and len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]


def test_files_without_labels_can_be_skipped(tmp_path, class_folders, png_writer, brain_png, caplog):
    png_writer(class_folders / "loose.png", brain_png(99, 16, 16))  # directly in the root: no class folder
    with pytest.raises(BrainfusionError, match=r"loose\.png sits directly in .* not in a class folder \(for column 'class'\)"):
        _labelled(_config(class_folders, labels="folders"))
    config = _config(class_folders, labels="folders", on_missing_label="skip")
    with caplog.at_level(logging.WARNING):
        images, cond = _labelled(config)
    assert len(images) == len(cond) == 9 and "loose.png" in caplog.text


def test_slice_level_from_volumes_and_from_oasis_names(tmp_path, phantom, png_writer, brain_png):
    import nibabel as nib

    (tmp_path / "vol").mkdir()
    nib.save(nib.Nifti1Image(phantom(), np.eye(4)), tmp_path / "vol" / "v.nii.gz")
    config = _config(tmp_path / "vol", slice_level=True)
    slices = load_slices(config.data, progress=False)
    assert np.allclose(slices.levels, np.array([2, 3, 4, 5, 6, 7]) / 9)  # axial k of 10, the empty ones dropped
    _images, cond = label_slices(config, slices)
    mean, std = config.condition.stats["level"]
    assert np.allclose(cond[:, 0] * std + mean, slices.levels, atol=1e-6)
    names = [f"/d/keras_png_slices_train/case_00{c}_slice_{k}.nii.png" for c in (1, 2) for k in (3, 4, 5)] + ["/d/x.png"]
    levels = slice_levels(names, None)
    assert levels[:6].tolist() == [0, 0.5, 1, 0, 0.5, 1] and math.isnan(levels[6])


def test_sampling_requests_are_encoded_by_the_vocabulary(class_folders):
    cc = _config(class_folders, labels="folders", slice_level=True, classes={"class": ("a", "b")}, stats={"level": (0.5, 0.25)}).condition
    cond = encode_request(cc, {"class": "b", "level": "0.75"}, 2)
    assert cond.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    partial = encode_request(cc, [{"class": "a"}, {"level": 0.25}], 2)
    assert partial[0, 0] == 0 and partial[1, 1] == -1 and partial[0, 1].isnan() and partial[1, 0].isnan()
    for bad, message in [({"klass": "a"}, "unknown to this model; it knows class, level"),
                         ({"class": "c"}, "'c' is not a class of condition 'class'; choose one of a, b"),
                         ({"level": "high"}, "needs a finite number")]:
        with pytest.raises(BrainfusionError, match=message):
            encode_request(cc, bad, 1)


def test_unconditional_network_is_unchanged_and_conditions_need_a_conditional_one():
    cfg = ModelConfig(image_size=16, base_channels=8, patch_size=1)
    torch.manual_seed(0)
    plain = UNet(cfg)
    torch.manual_seed(0)
    conditional = UNet(ModelConfig(image_size=16, base_channels=8, patch_size=1, class_counts=(3,), continuous_inputs=1))
    # the condition layers are built last: the shared layers start from the same weights
    assert all(torch.equal(p, conditional.state_dict()[k]) for k, p in plain.state_dict().items())
    assert count_parameters(conditional) > count_parameters(plain) and plain.condition is None
    with pytest.raises(BrainfusionError, match="built without condition inputs"):
        plain(torch.zeros(1, 1, 16, 16), torch.zeros(1), torch.zeros(1, 2))


def test_batch_with_cond_returns_the_conditions_of_the_same_slices():
    images = np.repeat(np.arange(12, dtype=np.uint8)[:, None, None] * 20, 16, axis=1).repeat(16, axis=2)
    cond = np.arange(12, dtype=np.float32)[:, None]
    stream = BatchStream(images, 4, seed=1, hflip=True, cond=cond)
    for step in range(5):
        x, c = stream.batch_with_cond(step)
        assert torch.equal(x, stream.batch(step))
        assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5 / 20).round(), c[:, 0])
    assert BatchStream(images, 4, seed=1, hflip=True).batch_with_cond(0)[1] is None


def test_label_dropout_is_seeded_per_step_and_split_across_ranks():
    cond = torch.arange(64 * 3, dtype=torch.float32).view(64, 3)
    whole = drop_labels(cond, 0.3, seeded_generator(0, 3, 5, 1), 64, 0)
    assert torch.equal(whole.isnan(), drop_labels(cond, 0.3, seeded_generator(0, 3, 5, 1), 64, 0).isnan())
    halves = [drop_labels(cond[r * 32 : (r + 1) * 32], 0.3, seeded_generator(0, 3, 5, 1), 64, r * 32) for r in (0, 1)]
    assert torch.equal(torch.cat(halves).isnan(), whole.isnan())
    share = drop_labels(torch.zeros(20000, 1), 0.1, seeded_generator(0, 3, 6, 1), 20000, 0).isnan().float().mean()
    assert abs(share - 0.1) < 0.01  # one condition: dropped with probability p exactly
    assert torch.equal(whole[~whole.isnan()], cond[~whole.isnan()])


def _conditional_pipeline(formulation: str) -> Pipeline:
    config = RunConfig()
    config.data.image_size = 32
    config.model = ModelConfig(image_size=32, base_channels=8, attention_resolutions=())
    config.diffusion.formulation = formulation
    config.condition.labels, config.condition.slice_level = "folders", True
    config.condition.classes, config.condition.stats = {"class": ("a", "b", "c")}, {"level": (0.5, 0.3)}
    config.train.max_steps = 1
    config.validate()
    torch.manual_seed(0)
    model = UNet(config.model)
    with torch.no_grad():  # a new network ignores its time and conditions (zero-initialised layers): as if trained
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return Pipeline(model, config, precision="fp32")


@pytest.mark.parametrize("formulation, sampler", [("edm", "dpm++sde"), ("edm", "heun"), ("vp", "ddim"), ("vp", "dpm++sde")])
def test_guidance_zero_is_the_null_condition_path_and_one_the_conditional(formulation, sampler):
    pipe = _conditional_pipeline(formulation)
    run = lambda **kw: pipe(3, seed=4, sampler=sampler, steps=3, **kw)  # noqa: E731
    wanted = {"class": "b", "level": 0.8}
    unconditional = run()
    assert np.array_equal(run(condition=wanted, guidance=0.0), unconditional)
    assert np.array_equal(run(condition={}), unconditional)  # no condition named: every one null
    conditional = run(condition=wanted)
    assert not np.array_equal(conditional, unconditional)
    assert np.array_equal(run(condition=wanted, guidance=1.0), conditional)
    guided = run(condition=wanted, guidance=3.0)
    assert not np.array_equal(guided, conditional)
    # image i of a seed is the same whatever the batch size, with the cond and uncond passes batched; up to one
    # grey level, since CPU convolutions of non-trivial weights round differently at other batch sizes (so do
    # unconditional ones: the fresh network of test_edm's batch-size test hides it behind zero-initialised layers)
    ones = np.concatenate([pipe(1, seed=4, sampler=sampler, steps=3, first_index=i, condition=wanted, guidance=3.0) for i in range(3)])
    assert np.abs(ones.astype(int) - guided).max() <= 1 and (ones != guided).mean() < 0.01


def test_guidance_mixes_the_conditional_and_unconditional_outputs():
    pipe = _conditional_pipeline("edm")
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([100.0, 700.0])
    cond = encode_request(pipe.config.condition, [{"class": "a"}, {"class": "c", "level": 0.1}], 2)
    c, u = pipe.network(x, t, cond), pipe.network(x, t, torch.full_like(cond, float("nan")))
    assert torch.allclose(classifier_free_guidance(pipe.network, cond, 2.5)(x, t), u + 2.5 * (c - u), atol=1e-5)
    with pytest.raises(BrainfusionError, match="needs a condition"):
        pipe(1, guidance=2.0)


def test_a_conditional_run_resumed_is_bitwise_the_uninterrupted_one(cli, tmp_path, class_folders):
    labels = ["--data", class_folders, "--labels", "folders", "--label-dropout", "0.5", *TRAIN]
    status, _, err = cli("train", "--out-dir", tmp_path / "split", "--max-steps", "2", *labels)
    assert status == 0, err
    status, _, err = cli("train", "--out-dir", tmp_path / "split", "--max-steps", "4", "--resume", *labels)
    assert status == 0, err
    status, _, err = cli("train", "--out-dir", tmp_path / "straight", "--max-steps", "4", *labels)
    assert status == 0, err
    resumed = load_checkpoint(tmp_path / "split" / "checkpoints" / "ckpt_00000004.safetensors")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000004.safetensors")
    assert any(k.startswith("condition.") for k in straight.model)
    for part in ("model", "ema"):
        for key, value in getattr(straight, part).items():
            assert torch.equal(getattr(resumed, part)[key], value), f"{part}.{key}"
    assert resumed.config.condition == straight.config.condition
    status, _, err = cli("train", "--out-dir", tmp_path / "split", "--max-steps", "6", "--resume", *TRAIN, "--data", class_folders)
    assert status == 2 and "trained with the conditions" in err  # resuming without the labels is refused


def test_conditional_model_trains_and_samples_through_the_cli(cli, tmp_path, class_folders, tiny_checkpoint):
    run = tmp_path / "conditional"
    status, out, err = cli("train", "--data", class_folders, "--out-dir", run, "--max-steps", "2", *TRAIN, "--labels", "folders")
    assert status == 0 and "trained to step 2" in out, err
    saved = json.loads((run / "config.json").read_text())["condition"]
    assert saved["classes"] == {"class": ["Mild", "Moderate", "None"]} and saved["labels"] == "folders"
    status, out, err = cli("sample", "--checkpoint", run, "--sampler", "dpm++sde", "--steps", "2", "--n", "3", "--no-gif",
                           "--condition", "class=Moderate", "--guidance", "2")
    assert status == 0, err
    result = json.loads(out)
    assert result["out_dir"].endswith("dpm++sde-2-class=Moderate-g2") and len(list((run / "samples").glob("*/images/*.png"))) == 3
    status, _, err = cli("sample", "--checkpoint", run, "--steps", "2", "--n", "1", "--condition", "class=Severe")
    assert status == 2 and "'Severe' is not a class of condition 'class'; choose one of Mild, Moderate, None" in err
    status, _, err = cli("sample", "--checkpoint", tiny_checkpoint, "--steps", "2", "--n", "1", "--condition", "class=Mild")
    assert status == 2 and "trained without conditions" in err

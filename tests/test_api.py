"""The public Python API at the top of the package: every name in `brainfusion.__all__` imports, loads lazily,
and a tiny train → sample round trip runs through the top-level names alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def test_every_public_name_imports_from_the_top():
    import brainfusion

    namespace: dict = {}
    exec("from brainfusion import *", namespace)  # noqa: S102 - what a user's star import sees
    assert set(brainfusion.__all__) <= set(namespace) and set(brainfusion.__all__) <= set(dir(brainfusion))
    assert {"Pipeline", "RunConfig", "load_config", "recipe_config", "train", "SampleConfig", "generate", "export_run",
            "BrainfusionPipeline", "BrainfusionError", "train_autoencoder", "AutoencoderRunConfig"} == set(brainfusion.__all__)
    from brainfusion.diffusion.pipeline import Pipeline
    from brainfusion.export.hub_pipeline import BrainfusionPipeline

    assert brainfusion.Pipeline is Pipeline and brainfusion.BrainfusionPipeline is BrainfusionPipeline
    assert all(callable(namespace[name]) for name in brainfusion.__all__)
    with pytest.raises(AttributeError, match="no attribute 'UNet'"):
        brainfusion.UNet  # noqa: B018 - internals stay in their subpackages


def test_importing_brainfusion_loads_no_torch_and_the_export_ships_no_init():
    """The names load on first use, so `import brainfusion` (and the CLI's start) stays cheap; the export's shipped
    code is hub_pipeline's closure, which never includes the package's __init__."""
    code = "import sys, brainfusion; assert 'torch' not in sys.modules, 'torch imported'; brainfusion.RunConfig"
    subprocess.run([sys.executable, "-c", code], check=True)
    from brainfusion.export.hub import shipped_source

    assert "_EXPORTS" not in shipped_source()


def test_a_tiny_train_then_sample_round_trip_through_the_top_level_names(tmp_path):
    from brainfusion import BrainfusionError, Pipeline, RunConfig, SampleConfig, generate, train
    from conftest import make_oasis
    from PIL import Image

    config = RunConfig()  # the default recipe, made tiny
    config.data.path, config.data.image_size = str(make_oasis(tmp_path / "oasis", n_train=8, n_test=2, n_validate=2)), 16
    config.model.base_channels, config.model.patch_size = 8, 1
    config.train.out_dir, config.train.max_steps, config.train.batch_size, config.train.checkpoint_every = str(tmp_path / "run"), 2, 4, 2
    result = train(config, progress=False)
    assert result.step == 2
    images = Pipeline.from_checkpoint(tmp_path / "run", precision="fp32")(3, steps=3)  # the default sampler, FAST_SAMPLER
    assert images.shape == (3, 16, 16) and images.dtype == np.uint8 and images.std() > 0
    written = generate(SampleConfig(checkpoint=str(tmp_path / "run"), out_dir=str(tmp_path / "samples"), n_images=3, steps=3,
                                    gif=False, precision="fp32"), progress=False)
    pngs = np.stack([np.asarray(Image.open(tmp_path / "samples" / "images" / f"sample_{i:05d}.png")) for i in range(3)])
    assert np.array_equal(pngs, images) and written["grid"].endswith("grid.png")  # SampleConfig's defaults are Pipeline's
    with pytest.raises(BrainfusionError, match="must both be positive"):
        generate(SampleConfig(checkpoint=str(tmp_path / "run"), n_images=0))

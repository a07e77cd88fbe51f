"""brainfusion: diffusion models for brain MRI slices, trained on a laptop CPU or a GPU.

The public Python API, what a notebook needs for train → sample → share::

    from brainfusion import Pipeline, RunConfig, train

    config = RunConfig()                                   # the default recipe; recipe_config("vp") names another
    config.data.path, config.train.out_dir, config.train.max_steps = "data/oasis", "runs/mine", 500
    train(config)
    images = Pipeline.from_checkpoint("runs/mine")(16)     # uint8 (16, 64, 64): SDE-DPM-Solver++, 25 steps, seed 0

Everything else lives in the subpackages and may change between releases. The names load on first use
(PEP 562), so `import brainfusion` costs no torch import and the command line starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name → the module that defines it (relative to this package)
_EXPORTS = {
    "BrainfusionError": ".errors",
    "RunConfig": ".config",
    "AutoencoderRunConfig": ".config",
    "load_config": ".config",
    "recipe_config": ".config",
    "train": ".training.train",
    "train_autoencoder": ".training.train_autoencoder",
    "Pipeline": ".diffusion.pipeline",
    "SampleConfig": ".diffusion.sample",
    "generate": ".diffusion.sample",
    "export_run": ".export.hub",
    "BrainfusionPipeline": ".export.hub_pipeline",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .config import AutoencoderRunConfig, RunConfig, load_config, recipe_config
    from .diffusion.pipeline import Pipeline
    from .diffusion.sample import SampleConfig, generate
    from .errors import BrainfusionError
    from .export.hub import export_run
    from .export.hub_pipeline import BrainfusionPipeline
    from .training.train import train
    from .training.train_autoencoder import train_autoencoder


def __getattr__(name: str):
    """Import a public name's module on first use, then keep the name here so later lookups skip this."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'brainfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

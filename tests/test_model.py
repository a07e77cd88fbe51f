"""The U-Net: shapes for every config knob, an exact parameter count, FLOPs and time conditioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brainfusion.config import ModelConfig
from brainfusion.models.unet import UNet, count_parameters, sinusoidal_embedding, training_flops_per_image

# Computed once from the default ModelConfig (full-resolution stem, patch size 1, base 48, mults 1,2,2,4, one
# block per level, attention at 8 px and in the bottleneck, 4 heads, GroupNorm(8)). A change here means the
# architecture changed: update it deliberately, never to make a failing test pass.
DEFAULT_PARAMETERS = 6_297_745

VARIANTS = {
    "plain": {},
    "two_blocks": {"blocks_per_level": 2},
    "no_attention": {"attention_resolutions": ()},
    "attention_16_8": {"attention_resolutions": (16, 8)},
    "batchnorm": {"norm": "batch"},
    "dropout": {"dropout": 0.2},
    "patch2": {"patch_size": 2},
}


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shape_equals_input_shape(size, variant):
    torch.manual_seed(0)
    model = UNet(ModelConfig(image_size=size, base_channels=8, **VARIANTS[variant])).train()
    x = torch.randn(2, 1, size, size)
    y = model(x, torch.tensor([3, 700]))
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("mults", [(1,), (1, 2, 2), (1, 2, 2, 4, 4)])
def test_level_count_follows_the_config(mults):
    cfg = ModelConfig(image_size=64, base_channels=8, channel_mults=mults)
    model = UNet(cfg)
    assert len(model.encoder) == len(model.decoder) == len(mults)
    x = torch.randn(2, 1, 64, 64)
    assert model(x, torch.tensor([3, 700])).shape == x.shape


def test_default_parameter_count_is_stable():
    model = UNet(ModelConfig())
    assert count_parameters(model) == DEFAULT_PARAMETERS


def _module_parameters(module: nn.Module) -> int:
    """Parameters a layer should own, from its hyper-parameters alone (no .numel() of weights)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels * (module.in_channels // module.groups) * kh * kw + (module.out_channels if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return module.out_features * module.in_features + (module.out_features if module.bias is not None else 0)
    if isinstance(module, nn.GroupNorm):
        return 2 * module.num_channels if module.affine else 0
    if isinstance(module, nn.BatchNorm2d):
        return 2 * module.num_features if module.affine else 0
    return 0


@pytest.mark.parametrize("cfg", [ModelConfig(), ModelConfig(norm="batch", blocks_per_level=2, base_channels=16)])
def test_parameter_count_matches_a_layer_by_layer_count(cfg):
    model = UNet(cfg)
    by_layer = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            assert isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.BatchNorm2d)), f"unexpected layer {name}: {module}"
        by_layer += _module_parameters(module)
    assert by_layer == count_parameters(model)
    if cfg == ModelConfig():
        assert by_layer == DEFAULT_PARAMETERS


def test_training_flops_are_positive_and_scale_with_area():
    model = UNet(ModelConfig(image_size=32, base_channels=8, patch_size=1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    f32 = training_flops_per_image(model, 32)
    f64 = training_flops_per_image(model, 64)
    assert f32 > 0
    # Convolutions dominate and cost ∝ pixels; attention moves to another level, so not exactly 4.
    assert 3.5 < f64 / f32 < 4.5, f64 / f32
    # forward + backward is about 3× a forward pass of two convolutions per pixel at least
    assert f32 > 3 * 2 * 32 * 32 * 8 * 8 * 9
    # counting leaves no gradients and does not touch the weights
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def test_sinusoidal_embedding_differs_for_different_t():
    t = torch.tensor([0, 1, 2, 500, 999])
    emb = sinusoidal_embedding(t, 32)
    assert emb.shape == (5, 32)
    assert torch.allclose(emb[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    distances = torch.cdist(emb, emb)
    off_diagonal = distances[~torch.eye(5, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3
    # fractional timesteps are embedded too, between their neighbours
    mid = sinusoidal_embedding(torch.tensor([1.5]), 32)[0]
    assert 0 < (mid - emb[1]).norm() < (emb[2] - emb[1]).norm()


def test_network_output_depends_on_t():
    torch.manual_seed(0)
    model = UNet(ModelConfig(image_size=32, base_channels=8)).eval()
    x = torch.randn(1, 1, 32, 32)
    emb = model.time_mlp(sinusoidal_embedding(torch.tensor([10, 900]), 8))
    assert not torch.allclose(emb[0], emb[1])
    # The last conv of each ResBlock starts at zero (so the untrained net ignores t); give the
    # blocks weights, as training does, and t must change the output.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and not module.weight.any():
                module.weight.normal_(0, 0.05)
    with torch.no_grad():
        a = model(x, torch.tensor([10]))
        b = model(x, torch.tensor([900]))
        a_again = model(x, torch.tensor([10]))
    assert torch.equal(a, a_again)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize(
    "bad",
    [
        {"base_channels": 9, "norm": "batch"},
        {"channel_mults": ()},  # no level at all
        {"channel_mults": (1, 2, 2, 4, 4), "image_size": 32, "patch_size": 2},  # 5 halvings of a 32 px image at patch size 2
        {"blocks_per_level": 0},
        {"base_channels": 10, "norm": "batch", "image_size": 32, "patch_size": 1, "channel_mults": (1, 2, 3, 4)},  # 30-wide attention at 8 px, 4 heads
        {"image_size": 40},
    ],
)
def test_impossible_model_configs_are_user_errors(bad):
    from brainfusion.errors import BrainfusionError

    with pytest.raises(BrainfusionError):
        UNet(ModelConfig(**bad))


def test_flop_counting_leaves_batchnorm_statistics_alone():
    model = UNet(ModelConfig(image_size=32, base_channels=8, norm="batch"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training_flops_per_image(model, 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

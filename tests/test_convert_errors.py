"""Converter error paths: wrong architecture, partial / extra / mis-shaped checkpoints,
unsupported block types and config values, missing files."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdiff.convert import (CheckpointMismatchError, UnsupportedConfigError, load_autoencoder_kl, load_diffusers,
                             load_unet, load_vq_model, save_diffusers, unet_config_from_diffusers)
from jaxdiff.nn import AutoencoderConfig, AutoencoderKL, UNet, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY_UNET = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, down_attention=(None, "self"),
                       norm_num_groups=4)
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


@pytest.fixture
def unet_dir(tmp_path):
    from flax import nnx
    d = str(tmp_path / "unet")
    save_diffusers(UNet(TINY_UNET, rngs=nnx.Rngs(0)), d)
    return d


@pytest.fixture
def vae_dir(tmp_path):
    from flax import nnx
    d = str(tmp_path / "vae")
    save_diffusers(AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(0)), d)
    return d


def _edit_weights(folder, fn):
    path = os.path.join(folder, WEIGHTS)
    sd = dict(load_file(path))
    fn(sd)
    save_file(sd, path)


def _edit_config(folder, **kw):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(kw)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_vae_folder_given_to_unet_loader(vae_dir, unet_dir):
    with pytest.raises(ValueError, match=r"holds a 'AutoencoderKL' checkpoint, expected one of \('UNet2DModel'"):
        load_unet(vae_dir)
    with pytest.raises(ValueError, match="holds a 'UNet2DModel' checkpoint"):
        load_autoencoder_kl(unet_dir)
    with pytest.raises(ValueError, match="holds a 'AutoencoderKL' checkpoint"):
        load_vq_model(vae_dir)


def test_weights_of_another_architecture_list_missing_and_unexpected(vae_dir, unet_dir):
    # a UNet config with VAE weights: every key is wrong
    os.replace(os.path.join(vae_dir, WEIGHTS), os.path.join(unet_dir, WEIGHTS))
    with pytest.raises(CheckpointMismatchError) as e:
        load_unet(unet_dir)
    assert "conv_in.weight" in e.value.missing
    assert "different architecture" in str(e.value)
    assert "time_embedding.linear_1.weight" in e.value.missing
    assert "encoder.conv_in.weight" in e.value.unexpected


def test_partial_checkpoint_lists_missing_unexpected_and_shapes(unet_dir):
    def damage(sd):
        del sd["mid_block.attentions.0.to_q.weight"]
        sd["mid_block.extra.weight"] = np.zeros(3, np.float32)
        sd["conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    _edit_weights(unet_dir, damage)
    with pytest.raises(CheckpointMismatchError) as e:
        load_unet(unet_dir)
    err = e.value
    assert err.missing == ["mid_block.attentions.0.to_q.weight"]
    assert err.unexpected == ["mid_block.extra.weight"]
    assert err.shape_mismatches == [("conv_out.weight", (3, 8, 3, 3), (3, 8, 1, 1))]
    msg = str(err)
    assert "missing keys (1): mid_block.attentions.0.to_q.weight" in msg
    assert "unexpected keys (1): mid_block.extra.weight" in msg
    assert "shape mismatch conv_out.weight" in msg


def test_legacy_attention_key_names_are_accepted(unet_dir):
    def rename(sd):
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            for leaf in ("weight", "bias"):
                sd[f"mid_block.attentions.0.{old}.{leaf}"] = sd.pop(f"mid_block.attentions.0.{new}.{leaf}")
    ref = load_unet(unet_dir)
    _edit_weights(unet_dir, rename)
    m = load_unet(unet_dir)
    np.testing.assert_array_equal(np.asarray(m.mid_block.attentions[0].to_q.kernel.get_value()),
                                  np.asarray(ref.mid_block.attentions[0].to_q.kernel.get_value()))


@pytest.mark.parametrize("key,value,match", [
    ("down_block_types", ["SkipDownBlock2D", "AttnDownBlock2D"], "unsupported down block type 'SkipDownBlock2D'"),
    ("up_block_types", ["AttnUpBlock2D", "KUpBlock2D"], "unsupported up block type 'KUpBlock2D'"),
    ("time_embedding_type", "fourier", "unsupported time_embedding_type='fourier'"),
    ("act_fn", "mish", "unsupported act_fn='mish'"),
    ("class_embed_type", "timestep", "unsupported class_embed_type='timestep'"),
    ("some_future_option", 3, "unsupported config key some_future_option=3"),
])
def test_unsupported_config_values_are_named(unet_dir, key, value, match):
    _edit_config(unet_dir, **{key: value})
    with pytest.raises(UnsupportedConfigError, match=match):
        load_unet(unet_dir)


def test_unsupported_condition_model_features():
    base = dict(_class_name="UNet2DConditionModel", block_out_channels=[32, 64],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8)
    unet_config_from_diffusers(base)  # fine
    for key, value in [("addition_embed_type", "text_time"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
                       ("dual_cross_attention", True), ("cross_attention_dim", [8, 16])]:
        with pytest.raises(UnsupportedConfigError, match=key):
            unet_config_from_diffusers(dict(base, **{key: value}))


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_unet(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(ValueError, match="unsupported diffusers class 'ControlNetModel'"):
        load_diffusers(str(tmp_path))

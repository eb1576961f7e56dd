"""Parity: randomly initialised diffusers UNets, saved as safetensors folders, loaded with
jaxdiff.convert, must give the same outputs (float32, max abs error <= 1e-4)."""
import numpy as np
import pytest

pytestmark = pytest.mark.parity

ATOL = 1e-4

DDPM_CIFAR10 = dict(  # google/ddpm-cifar10-32
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)

SMALL_COND = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 8), cross_attention_dim=24, norm_num_groups=8, transformer_layers_per_block=2)

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, cross_attention_dim=768,
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32)


def _save(model, path):
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _jax_forward(model, x_nchw, t, context=None, labels=None):
    import jax.numpy as jnp
    from flax import nnx

    f = nnx.jit(lambda m, x, t, c, y: m(x, t, c, y))
    out = f(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t),
            None if context is None else jnp.asarray(context), None if labels is None else jnp.asarray(labels))
    assert out.dtype == jnp.float32
    return np.asarray(out).transpose(0, 3, 1, 2)


def _pair(class_name, cfg, tmp_path, batch, seed):
    """A random-initialised diffusers model, its jaxdiff conversion, the rng and a random NCHW input."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from jaxdiff.convert import load_unet

    torch.manual_seed(seed)
    ref_model = getattr(diffusers, class_name)(**cfg).eval()
    model = load_unet(_save(ref_model, tmp_path))
    rng = np.random.RandomState(seed)
    s = cfg["sample_size"]
    return torch, ref_model, model, rng, rng.randn(batch, cfg["in_channels"], s, s).astype(np.float32)


def _check_unet2d(cfg, tmp_path, batch, labels=None, seed=0):
    torch, ref_model, model, rng, x = _pair("UNet2DModel", cfg, tmp_path, batch, seed)
    t = rng.randint(0, 1000, size=(batch,)).astype(np.int64)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t),
                        class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
    out = _jax_forward(model, x, t, labels=labels)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err <= ATOL, f"max abs error {err}"
    return model


def test_ddpm_cifar10_unet_parity(tmp_path):
    from jaxdiff.nn import count_params

    model = _check_unet2d(DDPM_CIFAR10, tmp_path, batch=1)
    assert count_params(model) == 35_746_307


def test_unet2d_scale_shift_classes_heads_parity(tmp_path):
    cfg = dict(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=16, norm_num_groups=8,
               resnet_time_scale_shift="scale_shift", num_class_embeds=5, mid_block_scale_factor=1.4142,
               center_input_sample=True, attn_norm_num_groups=4, time_embedding_dim=96)
    _check_unet2d(cfg, tmp_path, batch=2, labels=np.array([1, 4]))


def _check_cond(cfg, tmp_path, batch=2, seq=7, seed=0):
    torch, ref_model, model, rng, x = _pair("UNet2DConditionModel", cfg, tmp_path, batch, seed)
    t = rng.uniform(0, 1000, size=(batch,)).astype(np.float32)
    ctx = rng.randn(batch, seq, cfg["cross_attention_dim"]).astype(np.float32)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    out = _jax_forward(model, x, t, context=ctx)
    err = np.abs(out - ref).max()
    assert err <= ATOL, f"max abs error {err}"
    return model


def test_unet2d_condition_small_parity(tmp_path):
    _check_cond(SMALL_COND, tmp_path)


def test_unet2d_condition_linear_projection_parity(tmp_path):
    cfg = dict(SMALL_COND, use_linear_projection=True, attention_head_dim=4, transformer_layers_per_block=1)
    _check_cond(cfg, tmp_path, batch=1)


@pytest.mark.slow
def test_sd15_unet_parity(tmp_path):
    _check_cond(SD15_UNET, tmp_path, batch=1, seq=77)

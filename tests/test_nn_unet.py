"""Native behaviour of jaxdiff.nn.UNet: dtypes under x64, input validation, class conditioning
with a null class, remat, AdaGN, strided resampling, logical axis names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import UNet, UNetConfig, timestep_embedding

SMALL = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                   down_attention=(None, "self"), down_heads=(1, 2), norm_num_groups=8)
COND = SMALL.replace(down_attention=("cross", None), mid_attention="cross", cross_attention_dim=8)


_fwd = nnx.jit(lambda m, *a, **k: m(*a, **k))


def _x(b=2, s=8, c=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, s, s, c), jnp.float32)


def test_float32_output_with_x64_enabled_and_bf16_compute():
    assert jax.config.jax_enable_x64
    m = UNet(SMALL, rngs=nnx.Rngs(0))
    out = _fwd(m, np.random.randn(2, 8, 8, 3), np.array([1, 2], dtype=np.int64))  # float64 / int64 inputs
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    mb = UNet(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    outb = _fwd(mb, _x(), 5)
    assert outb.dtype == jnp.bfloat16
    assert mb.conv_in.kernel.get_value().dtype == jnp.float32  # params stay float32
    ref = _fwd(m, _x(), 5)
    assert float(jnp.abs(outb.astype(jnp.float32) - ref).max()) < 0.1 * float(jnp.abs(ref).max()) + 0.1


def test_bad_image_size_is_a_clear_value_error():
    m = UNet(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"9x8 is not divisible by 2"):
        m(jnp.zeros((1, 9, 8, 3)), 0)


def test_bad_channel_count_is_a_clear_value_error():
    m = UNet(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"4 channels but the config has in_channels=3"):
        m(jnp.zeros((1, 8, 8, 4)), 0)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        m(jnp.zeros((8, 8, 3)), 0)


def test_cross_attention_requires_matching_context():
    m = UNet(COND, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass context"):
        m(_x(), 0)
    with pytest.raises(ValueError, match=r"context must have shape \(B, S, 8\)"):
        m(_x(), 0, jnp.zeros((2, 4, 7)))
    out = _fwd(m, _x(), 0, jnp.ones((2, 4, 8)))
    out2 = _fwd(m, _x(), 0, -jnp.ones((2, 4, 8)))
    assert out.shape == (2, 8, 8, 3)
    assert float(jnp.abs(out - out2).max()) > 1e-4  # the context is actually used


def test_class_conditioning_with_null_class():
    cfg = SMALL.replace(num_classes=10, class_null=True)
    m = UNet(cfg, rngs=nnx.Rngs(0))
    assert m.null_label == 10
    assert m.class_embedding.embedding.get_value().shape == (11, 64)
    x = _x()
    a = _fwd(m, x, 3, labels=jnp.array([1, 2]))
    b = _fwd(m, x, 3, labels=jnp.full((2,), m.null_label))
    assert float(jnp.abs(a - b).max()) > 1e-4
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, 3)
    with pytest.raises(ValueError, match="no null class"):
        UNet(SMALL.replace(num_classes=10), rngs=nnx.Rngs(0)).null_label


def test_remat_gives_same_output_and_gradients():
    x, t = _x(), jnp.array([3.0, 700.0])
    grads = []
    tiny = COND.replace(block_out_channels=(8, 16), norm_num_groups=4, mid_attention="self")
    for remat in (False, True):
        m = UNet(tiny, remat=remat, rngs=nnx.Rngs(0))
        ctx = jnp.ones((2, 4, 8))
        loss = lambda mod: jnp.mean(mod(x, t, ctx) ** 2)
        grads.append(nnx.jit(nnx.grad(loss))(m))
    ga, gb = (jax.tree.leaves(g) for g in grads)
    assert len(ga) == len(gb) > 10
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_scale_shift_and_strided_resampling_variants():
    m = UNet(SMALL.replace(resnet_time_scale_shift="scale_shift", resample_with_conv=False, dropout=0.1),
             rngs=nnx.Rngs(0))
    assert m.down_blocks[0].resnets[0].time_emb_proj.kernel.get_value().shape == (64, 32)  # 2 x 16
    assert m.down_blocks[0].downsampler.conv is None
    m.eval()
    out = _fwd(m, _x(), 10)
    assert out.shape == (2, 8, 8, 3) and bool(jnp.isfinite(out).all())
    with pytest.raises(ValueError, match="time_embedding_norm"):
        UNet(SMALL.replace(resnet_time_scale_shift="spatial"), rngs=nnx.Rngs(0))


def test_params_carry_logical_axis_names():
    m = UNet(COND, rngs=nnx.Rngs(0))
    md = m.conv_in.kernel.get_metadata()
    assert md["out_sharding"] == ("conv_height", "conv_width", "conv_in", "conv_out")
    blk = m.down_blocks[0].attentions[0].transformer_blocks[0]
    assert blk.ff.geglu.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert blk.attn1.to_q.kernel.get_metadata()["out_sharding"] == ("embed", "heads")


def test_timestep_embedding_formula():
    t = jnp.array([0.0, 1.0, 999.0])
    e = timestep_embedding(t, 6, flip_sin_to_cos=False, freq_shift=1)
    freqs = np.exp(-np.log(10000.0) * np.arange(3) / 2.0)
    expect = np.concatenate([np.sin(np.asarray(t)[:, None] * freqs), np.cos(np.asarray(t)[:, None] * freqs)], -1)
    np.testing.assert_allclose(np.asarray(e), expect, rtol=1e-5, atol=1e-5)
    assert e.dtype == jnp.float32
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_attention_head_width_option():
    m = UNet(SMALL.replace(attention_head_dim=8), rngs=nnx.Rngs(0))
    assert m.down_blocks[1].attentions[0].heads == 4 and m.down_blocks[1].attentions[0].head_dim == 8
    assert m.mid_block.attentions[0].heads == 4
    assert m.config.down_heads == (2, 4) and m.config.attention_head_dim is None
    with pytest.raises(ValueError, match="attention_head_dim=12 does not divide"):
        UNet(SMALL.replace(attention_head_dim=12), rngs=nnx.Rngs(0))

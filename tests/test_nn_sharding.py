"""Sharding: params placed by logical-axis rules on a (data=4, fsdp=2) mesh of 8 host devices and
inputs sharded on batch give the single-device outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxdiff.nn import AutoencoderConfig, AutoencoderKL, UNet, UNetConfig
from jaxdiff.nn.sharding import batch_sharding, logical_to_mesh_axes, shard_state


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (host) devices")
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def test_logical_rules_drop_missing_axes_and_indivisible_dims(mesh):
    assert logical_to_mesh_axes(("embed", "mlp"), mesh) == PartitionSpec("fsdp", None)
    assert logical_to_mesh_axes(("batch", None), mesh) == PartitionSpec(("data", "fsdp"), None)
    # conv_in of 3 channels cannot be split in 2: replicated
    spec = logical_to_mesh_axes(("conv_height", "conv_width", "conv_in", "conv_out"), mesh, shape=(3, 3, 3, 32))
    assert spec == PartitionSpec(None, None, None, None)
    # the same mesh axis is never used twice in one spec
    assert logical_to_mesh_axes(("embed", "conv_in"), mesh) == PartitionSpec("fsdp", None)


def test_sharded_cross_attention_unet_matches_single_device(mesh):
    cfg = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_attention=("cross", "self"), down_heads=2, mid_attention="cross",
                     cross_attention_dim=16, norm_num_groups=8)
    model = UNet(cfg, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (8, 16, 16, 4), jnp.float32)
    ctx = jax.random.normal(k2, (8, 5, 16), jnp.float32)
    t = jnp.arange(8, dtype=jnp.float32) * 100
    ref = np.asarray(nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, t, ctx))

    graphdef, state = nnx.split(model)
    sharded = shard_state(state, mesh)
    kernel = sharded["down_blocks"][0]["resnets"][0]["conv1"]["kernel"].get_value()
    assert kernel.sharding.spec == PartitionSpec(None, None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (3, 3, 16, 32)  # really split over fsdp
    q = sharded["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
    assert q.get_value().sharding.spec == PartitionSpec("fsdp", None)

    bs = lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim))
    f = jax.jit(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), out_shardings=batch_sharding(mesh, 4))
    out = f(sharded, bs(x), bs(t), bs(ctx))
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, None, None)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_sharded_autoencoder_matches_single_device(mesh):
    cfg = AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (8, 16, 16, 3), jnp.float32)
    ref = np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, x))
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0], out_shardings=batch_sharding(mesh, 4))
    out = f(shard_state(state, mesh), jax.device_put(x, batch_sharding(mesh, 4)))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)

"""LoRA adapters on NNX models (jaxdiff.nn.lora): selection by patterns, zero delta at init, merge/unmerge,
frozen-base filters, dropout, and the errors for bad targets and ranks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import Conv2d, Dense, Transformer2D, UNet, UNetConfig
from jaxdiff.nn.lora import (BASE_PARAMS, LORA_PARAMS, LoRAConv2d, LoRADense, LoRASpec, add_lora, lora_layers,
                             lora_mask, merge_lora, split_lora, strip_lora, unmerge_lora)

CFG = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                 down_attention=("cross", None), down_heads=2, mid_attention=None, cross_attention_dim=4,
                 norm_num_groups=4)


def _unet(seed=0):
    return UNet(CFG, rngs=nnx.Rngs(seed))


def _inputs():
    r = np.random.RandomState(0)
    return (jnp.asarray(r.randn(2, 4, 4, 1), jnp.float32), jnp.array([3.0, 700.0]),
            jnp.asarray(r.randn(2, 3, 4), jnp.float32))


def _perturb_adapters(model, seed=1, dyadic=False):
    r = np.random.RandomState(seed)
    for layer in lora_layers(model).values():
        for v in (layer.lora.lora_a, layer.lora.lora_b):
            x = r.randn(*v.shape)
            v[...] = jnp.asarray(np.round(x * 8) / 8 if dyadic else x * 0.3, v.dtype)


def test_adapters_on_matched_layers_share_the_base_and_start_at_zero():
    model = _unet()
    kernel_before = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.kernel
    base_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    x, t, ctx = _inputs()
    y0 = model(x, t, ctx)
    paths = add_lora(model, LoRASpec(targets=("cross_kv", r".*proj_in"), rank=2), rngs=nnx.Rngs(5))
    assert paths[:3] == ["down_blocks.0.attentions.0.proj_in",
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert len(paths) == 3 * 3 and paths[-1] == "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
    k = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    assert isinstance(k, LoRADense) and k.kernel is kernel_before          # shared, not copied
    assert isinstance(model.down_blocks[0].attentions[0].proj_in, LoRAConv2d)
    # the base keeps its parameter paths; the adapters are the only new (LoRAParam) leaves
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))} == base_paths
    adapters = nnx.to_flat_state(nnx.state(model, LORA_PARAMS))
    assert len(adapters) == 2 * len(paths) and all(p[-2] == "lora" for p, _ in adapters)
    np.testing.assert_array_equal(model(x, t, ctx), y0)                    # lora_b = 0 at init
    mask = lora_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert sum(v for _, v in flat_mask) == 2 * len(paths)


def test_merged_forward_equals_adapter_forward_and_unmerge_round_trips():
    model = _unet()
    add_lora(model, LoRASpec(targets=("attention", "feed_forward", r".*proj_(in|out)"), rank=2, alpha=3.0),
             rngs=nnx.Rngs(1))
    _perturb_adapters(model)
    x, t, ctx = _inputs()
    y_adapter = model(x, t, ctx)
    base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    np.testing.assert_allclose(model(x, t, ctx), y_adapter, atol=2e-5)
    assert not np.array_equal(model(x, t, ctx), jnp.zeros(()))
    unmerge_lora(model)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    # rounding: (W + d) - d is W up to one ulp of |W + d| (float32)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=4e-7 * (1 + np.abs(a).max())),
                 after, base)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)


def test_merge_unmerge_is_bitwise_on_exactly_representable_deltas():
    model = _unet()
    add_lora(model, LoRASpec(targets=("cross_kv",), rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    for layer in lora_layers(model).values():   # dyadic base weights: no rounding in W + d or (W + d) - d
        layer.kernel[...] = jnp.round(layer.kernel[...] * 64) / 64
    _perturb_adapters(model, dyadic=True)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    merge_lora(model)
    changed = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, changed, before)))
    unmerge_lora(model)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)), before)


def test_gradients_reach_only_the_adapters_and_strip_restores_plain_layers():
    model = Transformer2D(8, heads=2, head_dim=4, context_dim=4, norm_groups=4, rngs=nnx.Rngs(0))
    add_lora(model, LoRASpec(targets=("cross_kv", r"proj_in"), rank=2), rngs=nnx.Rngs(1))
    _perturb_adapters(model)
    graphdef, adapters, base, rest = split_lora(model)
    r = np.random.RandomState(0)
    x, ctx = jnp.asarray(r.randn(2, 4, 4, 8), jnp.float32), jnp.asarray(r.randn(2, 3, 4), jnp.float32)

    def loss(ad):
        return jnp.mean(nnx.merge(graphdef, ad, base, rest)(x, ctx) ** 2)
    grads = jax.grad(loss)(adapters)
    assert {p for p, _ in nnx.to_flat_state(grads)} == {p for p, _ in nnx.to_flat_state(adapters)}
    assert len(nnx.to_flat_state(grads)) == 6
    assert all(float(jnp.abs(g[...]).max()) > 0 for _, g in nnx.to_flat_state(grads))
    y = model(x, ctx)
    merge_lora(model)
    strip_lora(model)
    assert not lora_layers(model) and not nnx.to_flat_state(nnx.state(model, LORA_PARAMS))
    assert type(model.proj_in) is Conv2d and type(model.transformer_blocks[0].attn2.to_k) is Dense
    np.testing.assert_allclose(model(x, ctx), y, atol=2e-5)


def test_dropout_acts_in_training_only():
    model = _unet()
    add_lora(model, LoRASpec(targets=("cross_kv",), rank=2, dropout=0.5), rngs=nnx.Rngs(1, dropout=2))
    _perturb_adapters(model)
    x, t, ctx = _inputs()
    model.train()
    a, b = model(x, t, ctx), model(x, t, ctx)
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(x, t, ctx), model(x, t, ctx))


def test_bad_targets_and_ranks_are_named():
    model = _unet()
    with pytest.raises(ValueError, match=r"\['.*nonexistent'\] match no Dense or Conv2d"):
        add_lora(model, LoRASpec(targets=("cross_kv", r".*nonexistent")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds min"):
        add_lora(model, LoRASpec(targets=("cross_kv",), rank=5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be an integer"):
        add_lora(model, LoRASpec(rank=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="list of patterns"):
        add_lora(model, LoRASpec(targets="attention"), rngs=nnx.Rngs(0))
    assert not lora_layers(model)   # nothing was attached by the failed calls
    add_lora(model, LoRASpec(targets=("cross_kv",), rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(model, LoRASpec(targets=("cross_kv",), rank=2), rngs=nnx.Rngs(0))

"""C-LoRA (jaxdiff.research.c_lora): the self-regularization formula, one continual task changing only the
cross-attention K/V weights (LoRA folded in, or trained directly), and the continual-learning summary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn import UNet, UNetConfig
from jaxdiff.nn.lora import LoRASpec, add_lora, lora_layers
from jaxdiff.noise import make_process
from jaxdiff.research.c_lora import (KV_PATTERN, FitSettings, accuracy_matrix_summary, fit_concept,
                                     forget_penalty, kv_kernels, make_loss)

CFG = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                 down_attention=(None, "cross"), down_heads=2, mid_attention=None, cross_attention_dim=4,
                 norm_num_groups=4)


def test_forget_penalty_is_the_masked_frobenius_norm():
    model = UNet(CFG, rngs=nnx.Rngs(0))
    add_lora(model, LoRASpec(targets=(KV_PATTERN,), rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    r = np.random.RandomState(0)
    past, want = {}, 0.0
    for k, layer in lora_layers(model).items():
        layer.lora.lora_b[...] = r.randn(*layer.lora.lora_b.shape).astype(np.float32)
        past[k] = r.randn(*layer.kernel.shape).astype(np.float32)
        delta = 2.0 * np.asarray(layer.lora.lora_a[...]) @ np.asarray(layer.lora.lora_b[...])
        want += float(np.sum((np.abs(past[k]) * delta) ** 2))
    assert len(past) == 6
    np.testing.assert_allclose(float(forget_penalty(model, past)), want, rtol=1e-5)
    np.testing.assert_allclose(float(forget_penalty(model, {k: 0 * v for k, v in past.items()})), 0.0)


@pytest.mark.parametrize("mode,lam", [("lora", 1e3), pytest.param("full_kv", 0.0, marks=pytest.mark.slow)])
def test_a_task_changes_only_the_kv_weights_and_learns_a_token(mode, lam):
    model = UNet(CFG, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    w_init = kv_kernels(model)
    images = np.random.RandomState(1).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    prefix = jnp.ones((4,))
    token = fit_concept(model, prefix, images, make_loss(make_process("vp_cosine")),
                        FitSettings(steps=2, lr=1e-2, batch=4, lam=lam), jax.random.key(0), mode=mode, w_init=w_init)
    assert token.shape == (4,) and not lora_layers(model)        # adapters folded in and removed
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    changed = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(after)[0]
               if not np.array_equal(np.asarray(v), flat_b[p])]
    assert len(changed) == 6 and all("'attn2'" in c and ("'to_k'" in c or "'to_v'" in c) for c in changed)
    with pytest.raises(ValueError, match="needs mode='lora' and w_init"):
        fit_concept(model, prefix, images, None, FitSettings(lam=1.0), jax.random.key(0), mode="full_kv")


def test_accuracy_matrix_summary():
    acc = np.array([[1.0, np.nan, np.nan], [0.5, 0.8, np.nan], [0.25, 0.4, 0.9]])
    s = accuracy_matrix_summary(acc)
    np.testing.assert_allclose(s["average_accuracy"], (0.25 + 0.4 + 0.9) / 3)
    np.testing.assert_allclose(s["forgetting"], ((1.0 - 0.25) + (0.8 - 0.4)) / 2)
    np.testing.assert_allclose(s["plasticity"], (1.0 + 0.8 + 0.9) / 3)

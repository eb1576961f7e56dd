"""diffusers-format LoRA files without torch (jaxdiff.convert.lora): save -> load round trip and the errors for
a file of another architecture or rank."""
import numpy as np
import pytest
from flax import nnx

from jaxdiff.convert.lora import load_lora_diffusers, read_lora_file, save_lora_diffusers
from jaxdiff.nn import Transformer2D
from jaxdiff.nn.lora import LoRASpec, add_lora, lora_layers, merge_lora


def _block(channels=8, seed=0):
    return Transformer2D(channels, heads=2, head_dim=channels // 2, context_dim=4, norm_groups=4, rngs=nnx.Rngs(seed))


def _adapted(rank=2, alpha=3.0, channels=8):
    m = _block(channels)
    add_lora(m, LoRASpec(targets=("attention", "proj_in"), rank=rank, alpha=alpha), rngs=nnx.Rngs(1))
    r = np.random.RandomState(2)
    for layer in lora_layers(m).values():
        layer.lora.lora_b[...] = r.randn(*layer.lora.lora_b.shape).astype(np.float32)
    return m


def test_round_trip_restores_adapters_rank_and_alpha(tmp_path):
    m = _adapted()
    path = save_lora_diffusers(m, str(tmp_path))
    sd, meta = read_lora_file(str(tmp_path))
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 3.0
    assert "unet.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in sd     # diffusers module names
    assert sd["unet.proj_in.lora_A.weight"].shape == (2, 8, 1, 1)               # conv layout (r, in, kh, kw)
    fresh = _block()
    paths = load_lora_diffusers(fresh, path)
    assert paths == sorted(lora_layers(m))
    r = np.random.RandomState(0)
    x, ctx = r.randn(1, 4, 4, 8).astype(np.float32), r.randn(1, 3, 4).astype(np.float32)
    np.testing.assert_array_equal(fresh(x, ctx), m(x, ctx))
    load_lora_diffusers(fresh, path)       # same adapters again: overwritten in place


def test_bad_lora_files_are_named(tmp_path):
    path = save_lora_diffusers(_adapted(), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_lora_diffusers(_block(channels=16), path)
    with pytest.raises(ValueError, match="do not exist here"):
        load_lora_diffusers(nnx.eval_shape(lambda: _block()).transformer_blocks[0].ff, path)
    with pytest.raises(ValueError, match="no peft LoRA keys"):
        load_lora_diffusers(_block(), path, prefix="text_encoder")
    other = _adapted(rank=3)
    with pytest.raises(ValueError, match="rank 2 but the model's adapters have rank"):
        load_lora_diffusers(other, path)
    merge_lora(other)
    with pytest.raises(ValueError, match="merged"):
        load_lora_diffusers(other, path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora_diffusers(_block(), str(tmp_path / "b"))

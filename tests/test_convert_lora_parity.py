"""LoRA interop with diffusers/peft: a peft LoRA on a tiny diffusers UNet2DConditionModel, saved with
``save_lora_weights``, gives the same outputs in jaxdiff; a jaxdiff LoRA loaded by diffusers' own
``load_lora_weights`` gives the same outputs in PyTorch (float32, max abs error <= 1e-4). Every base and
adapter parameter is perturbed away from its init (lora_B starts at zero)."""
import numpy as np
import pytest

pytestmark = pytest.mark.parity

ATOL = 1e-4
CFG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           attention_head_dim=4, cross_attention_dim=12, norm_num_groups=8)
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1"]


def _torch_parts():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class UNetOnlyPipeline(StableDiffusionLoraLoaderMixin):
        """The smallest host of diffusers' pipeline-level load_lora_weights: a UNet and no text encoder."""

        def __init__(self, unet):
            self.unet, self.text_encoder, self.hf_device_map = unet, None, None
            self.components = {"unet": unet}
    return torch, diffusers, UNetOnlyPipeline


def _perturb(torch, params, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _inputs(seed=0):
    r = np.random.RandomState(seed)
    return (r.randn(2, 4, 8, 8).astype(np.float32), np.array([5.0, 640.0], np.float32),
            r.randn(2, 5, 12).astype(np.float32))


def _torch_out(torch, unet, x, t, ctx):
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


def _jax_out(model, x, t, ctx):
    import jax.numpy as jnp
    return np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))).transpose(0, 3, 1, 2)


def _base(torch, diffusers, tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**CFG).eval()
    _perturb(torch, unet.parameters(), 1, 0.05)          # norms, biases, zero-init convs all move
    unet.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    return str(tmp_path / "base")


def test_diffusers_lora_loads_into_jaxdiff(tmp_path):
    torch, diffusers, _ = _torch_parts()
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from jaxdiff.convert import load_unet
    from jaxdiff.convert.lora import load_lora_diffusers
    from jaxdiff.nn.lora import LoRAConv2d, lora_layers

    base = _base(torch, diffusers, tmp_path)
    unet = diffusers.UNet2DConditionModel.from_pretrained(base).eval()
    config = LoraConfig(r=3, lora_alpha=5, target_modules=PEFT_TARGETS, init_lora_weights="gaussian")
    unet.add_adapter(config)
    _perturb(torch, [p for n, p in unet.named_parameters() if "lora_" in n], 2, 0.3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    x, t, ctx = _inputs()
    ref = _torch_out(torch, unet, x, t, ctx)

    model = load_unet(base)
    plain = _jax_out(model, x, t, ctx)
    paths = load_lora_diffusers(model, str(tmp_path / "lora"))
    assert len(paths) == len([n for n, _ in unet.named_modules() if n.endswith(".lora_A")])
    assert any(isinstance(layer, LoRAConv2d) for layer in lora_layers(model).values())
    out = _jax_out(model, x, t, ctx)
    assert np.abs(plain - ref).max() > 1e-2           # the adapters matter
    err = np.abs(out - ref).max()
    assert err <= ATOL, f"max abs error {err}"


@pytest.mark.slow   # ~60 s under load; the diffusers -> jaxdiff direction runs by default
def test_jaxdiff_lora_loads_into_diffusers(tmp_path):
    torch, diffusers, UNetOnlyPipeline = _torch_parts()
    from flax import nnx

    from jaxdiff.convert import load_unet
    from jaxdiff.convert.lora import save_lora_diffusers
    from jaxdiff.nn.lora import LoRASpec, add_lora, lora_layers

    base = _base(torch, diffusers, tmp_path)
    model = load_unet(base)
    add_lora(model, LoRASpec(targets=("attention", "feed_forward", r".*resnets\.\d+\.conv1", r".*proj_out"),
                             rank=2, alpha=3.0), rngs=nnx.Rngs(1))
    r = np.random.RandomState(3)
    for layer in lora_layers(model).values():
        for v in (layer.lora.lora_a, layer.lora.lora_b):
            v[...] = 0.3 * r.randn(*v.shape).astype(np.float32)
    save_lora_diffusers(model, str(tmp_path / "lora"))
    x, t, ctx = _inputs(1)
    out = _jax_out(model, x, t, ctx)

    unet = diffusers.UNet2DConditionModel.from_pretrained(base).eval()
    plain = _torch_out(torch, unet, x, t, ctx)
    UNetOnlyPipeline(unet).load_lora_weights(str(tmp_path / "lora"))
    ref = _torch_out(torch, unet, x, t, ctx)
    assert np.abs(plain - ref).max() > 1e-2
    err = np.abs(out - ref).max()
    assert err <= ATOL, f"max abs error {err}"

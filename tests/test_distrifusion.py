"""research.distrifusion: the patch-parallel UNet on 8 host CPU devices (tests/conftest.py sets them)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.nn.functional import make_apply, split_model
from jaxdiff.nn.layers import Conv2d
from jaxdiff.nn.unet import UNet, UNetConfig
from jaxdiff.noise import make_process
from jaxdiff.research.distrifusion import DistriConfig, PatchParallelUNet, patch_parallel_sampling_model
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel

ADM = UNetConfig(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                 down_attention=(None, "self"), norm_num_groups=4, num_classes=3,
                 resnet_time_scale_shift="scale_shift")
SD = UNetConfig(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                down_attention=(None, "cross"), norm_num_groups=4, cross_attention_dim=6, downsample_padding=0)


def _perturbed_unet(config, seed=0):
    """A UNet with every parameter (norm scales and biases included) moved away from its init."""
    unet = UNet(config, rngs=nnx.Rngs(seed))
    params = nnx.state(unet, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(unet, jax.tree.unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]))
    return unet


def _params(unet):
    return nnx.to_pure_dict(nnx.state(unet, nnx.Param))


def test_sync_equals_one_device_on_8_patches():
    unet = _perturbed_unet(ADM)
    x = jax.random.normal(jax.random.key(2), (2, 16, 8, 2))
    t, labels = jnp.array([3.0, 700.0]), jnp.array([0, 2])
    ref = unet(x, t, labels=labels)
    pp = PatchParallelUNet.from_module(unet, DistriConfig(patches=8, mode="sync"))
    out = jax.jit(pp)(_params(unet), x, t, labels)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(ref).max()) > 0.5          # a real output, not a degenerate one


def test_bad_input_errors():
    unet = _perturbed_unet(ADM)
    with pytest.raises(ValueError, match="patches do not divide the latent rows"):
        PatchParallelUNet.from_module(unet, DistriConfig(patches=3, mode="sync")).check_shape((1, 16, 8, 2))
    with pytest.raises(ValueError, match="patches do not divide the latent rows"):
        # 16 rows, 1 downsampling: 16 patches would leave half a row at the second level
        PatchParallelUNet.from_module(unet, DistriConfig(patches=8)).check_shape((1, 8, 8, 2))
    with pytest.raises(ValueError, match="patches need 9 devices"):
        PatchParallelUNet.from_module(unet, DistriConfig(patches=9))
    for bad in (dict(patches=0), dict(patches=2, mode="async"), dict(patches=2, warmup=-1),
                dict(patches=2, group_norm="batch")):
        with pytest.raises(ValueError):
            DistriConfig(**bad)

    class ShiftedConv(nnx.Module):        # a layer whose spatial behaviour the walk cannot know
        def __init__(self, conv):
            self.conv = conv

        def __call__(self, x):
            return jnp.roll(self.conv(x), 1, axis=1)

    if "low_res_channels" in UNetConfig.__dataclass_fields__:
        sr = UNet(ADM.replace(low_res_channels=2), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="does not cover super-resolution UNets"):
            PatchParallelUNet.from_module(sr, DistriConfig(patches=2))

    unet.down_blocks[0].resnets[0].conv1 = ShiftedConv(unet.down_blocks[0].resnets[0].conv1)
    with pytest.raises(ValueError, match=r"does not cover the layer down_blocks/0/resnets/0/conv1 .*ShiftedConv"):
        PatchParallelUNet.from_module(unet, DistriConfig(patches=2))
    assert isinstance(unet.down_blocks[0].resnets[0].conv1.conv, Conv2d)


def test_lora_adapters_on_linears_are_covered_on_convs_refused():
    from jaxdiff.nn.lora import LoRASpec, add_lora
    from jaxdiff.research.distrifusion import check_covered
    unet = _perturbed_unet(ADM)
    add_lora(unet, LoRASpec(targets=("attention",), rank=2), rngs=nnx.Rngs(0))
    check_covered(unet)
    add_lora(unet, LoRASpec(targets=(r"down_blocks\.0\.resnets\.0\.conv1",), rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="down_blocks/0/resnets/0/conv1 of type .*LoRAConv2d"):
        check_covered(unet)


def test_sampling_model_errors():
    unet = _perturbed_unet(ADM)
    g, p, r = split_model(unet)
    model = SamplingModel(apply=make_apply(g, r), params=nnx.to_pure_dict(p), process=make_process("vp_linear"),
                          prediction="eps", shape=(12, 8, 2), num_classes=3)
    with pytest.raises(ValueError, match="4 patches do not divide the latent rows: the UNet's 12 rows"):
        patch_parallel_sampling_model(model, DistriConfig(patches=4))
    foreign = SamplingModel(apply=lambda p, x, t, c=None: x, params={}, process=model.process,
                            prediction="eps", shape=(16, 8, 2))
    with pytest.raises(ValueError, match="make_apply"):
        patch_parallel_sampling_model(foreign, DistriConfig(patches=2))


def _sd_model():
    unet = _perturbed_unet(SD, seed=3)
    g, p, r = split_model(unet)
    return SamplingModel(apply=make_apply(g, r, condition="context"), params=nnx.to_pure_dict(p),
                         process=make_process("vp_linear"), prediction="eps", shape=(16, 8, 2),
                         context_shape=(3, 6))


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["ddim", "dpm_solver++", "heun"])
def test_sampler_sync_and_displaced_through_sample(solver):
    """SD-style UNet (cross-attention, LDM downsample padding) through the ordinary Sampler: sync patches and
    a displaced run whose warm-up covers every evaluation equal the one-device samples; a displaced run with
    stale exchanges differs from them, and less than the exchange-free naive patches."""
    model = _sd_model()
    ctx = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    settings = SamplerSettings(solver=solver, steps=4)
    key = jax.random.key(0)
    ref = Sampler(model, settings)(model.params, None, key, context=ctx)
    out = {}
    for name, cfg in {"sync": DistriConfig(4, "sync"), "all_warm": DistriConfig(4, "displaced", warmup=20),
                      "displaced": DistriConfig(4, "displaced", warmup=1), "naive": DistriConfig(4, "naive")}.items():
        m = patch_parallel_sampling_model(model, cfg)
        out[name] = Sampler(m, settings)(m.params, None, key, context=ctx)
    np.testing.assert_allclose(out["sync"], ref, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(out["all_warm"], ref, rtol=2e-5, atol=1e-4)
    err = {k: float(np.mean((out[k] - ref) ** 2)) for k in ("displaced", "naive")}
    assert 1e-10 < err["displaced"] < err["naive"], err


def test_exchange_log_and_bytes():
    """Every 3x3 conv but the first exchanges two halo rows, every self-attention its K/V, every GroupNorm its
    moments; the bytes follow the ring formulas; patch parallelism moves less than tensor parallelism."""
    from jaxdiff.research.distrifusion.comm import bytes_per_step, exchange_log
    unet = _perturbed_unet(ADM)
    n = 4
    pp = PatchParallelUNet.from_module(unet, DistriConfig(patches=n))
    log = exchange_log(pp, 1, (16, 8, 2))
    modules = [m for _, m in nnx.iter_modules(unet)]
    convs = [m for m in modules if isinstance(m, Conv2d) and m.kernel.shape[0] == 3]
    kinds = [e[0] for e in log]
    assert kinds.count("halo") == 2 * (len(convs) - 1)
    attentions = sum(type(m).__name__ == "SpatialSelfAttention" for m in modules)
    assert kinds.count("kv") == attentions >= 3
    assert kinds.count("group_norm") == sum(type(m).__name__ == "GroupNorm" for m in modules)
    b = bytes_per_step(log, n)
    kv = [e for e in log if e[0] == "kv"][0]
    assert kv[2] == (1, (16 // 2 // n) * (8 // 2), 2 * 16)      # (B, tokens of a patch at 8x4, 2 x inner)
    assert b["kv"] == attentions * (n - 1) * int(np.prod(kv[2])) * 4
    assert b["output"] == (n - 1) * 1 * (16 // n) * 8 * 2 * 4
    assert b["patch_parallel"] == b["halo"] + b["kv"] + b["group_norm"] + b["output"] < b["tp"]


@pytest.mark.slow
def test_hlo_displaced_branch_defers_exchanges():
    """In the compiled displaced step only the output all-gather feeds the model output; in the warm-up branch
    every exchange does."""
    from jaxdiff.research.distrifusion.comm import hlo_collectives
    unet = _perturbed_unet(ADM)
    pp = PatchParallelUNet.from_module(unet, DistriConfig(patches=2, mode="displaced", warmup=1))

    def step(params, x, t, labels):
        return pp.start(x.shape[0], x.shape[1:])(params, x, t, labels)

    text = jax.jit(step).lower(_params(unet), jnp.zeros((1, 16, 8, 2)), jnp.ones((1,)),
                               jnp.zeros((1,), jnp.int32)).compile().as_text()
    branches = hlo_collectives(text)["branches"]
    assert len(branches) == 2
    feeding = sorted((b["feeding_output"], b["total"]) for b in branches)
    assert feeding[0][0] == 1 and feeding[0][1] > 10          # displaced: only the output gather is waited for
    assert feeding[1][0] == feeding[1][1] > 10                  # warm-up: all of them

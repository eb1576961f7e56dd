"""The shipped configs in configs/: each builds its UNet abstractly (``nnx.eval_shape``: shapes only, no
parameter memory, no initialisation compute) with a parameter count in the expected range, and each
declares the data layout its dataset needs."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdiff.train_lib import config as config_lib
from jaxdiff.nn.functional import split_model
from jaxdiff.train_lib.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (low, high) parameter counts: the published models these configs follow
EXPECTED_PARAMS = {
    "digits": (1e5, 2e6),            # the small CPU demo
    "cifar10": (34e6, 38e6),         # DDPM's CIFAR-10 UNet: 35.7M
    "celeba64": (50e6, 120e6),       # DDPM-style, channels up to 512 at 64x64
    "imagenet64": (250e6, 320e6),    # ADM ImageNet-64: 296M
    "ae_digits": (1e5, 2e6),         # f4 KL autoencoder on 32x32 digits (task="autoencoder")
    "ae_photos": (1e5, 2e6),         # the same on 32x32 photo crops
    "ldm_digits": (1e5, 3e6),        # class-conditional UNet on 8x8x3 latents
    "text_digits": (1e5, 2e6),       # text-conditioned 16x16 UNet + its small text transformer
    "sadm_digits": (1e5, 2e6),       # the digits UNet, trained with a structure discriminator (task="sadm")
    "cascade_digits_base8": (2e4, 5e5),    # cascade base model at 8x8
    "cascade_digits_sr16": (1e5, 1e6),     # super-resolution 8 -> 16
    "cascade_digits_sr32": (1e5, 1e6),     # super-resolution 16 -> 32
    "lora_text_digits": (5e3, 5e4),  # task="lora": adapters + a new token row on the text_digits base
}
LORA_BASE_CONFIGS = {"lora_text_digits": "text_digits"}   # a LoRA config's size: what it trains on this base


def _shipped():
    return sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "configs"))
                  if n.endswith(".py") and not n.startswith("_"))


def _load(name):
    return config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def _lora_param_count(config, base_name: str) -> int:
    """Trained parameters of a task="lora" config on the base config it is written for: adapters + new rows."""
    from jaxdiff.nn.lora import LORA_PARAMS, add_lora
    from jaxdiff.train_lib.lora_experiment import lora_spec
    from jaxdiff.train_lib.text_diffusion import build_text_model
    base = _load(base_name)

    def build():
        model = build_text_model(base)
        add_lora(model.unet, lora_spec(config), rngs=nnx.Rngs(0))
        return model
    adapters = nnx.state(nnx.eval_shape(build), LORA_PARAMS)
    rows = len(config.lora.new_tokens) * base.text.width
    return rows + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def _abstract_param_count(config) -> int:
    if config.task == "autoencoder":
        from jaxdiff.train_lib.ae_experiment import build_autoencoder
        model = nnx.eval_shape(lambda: build_autoencoder(config, seed=config.seed))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if config.text.encoder is not None:
        from jaxdiff.train_lib.text_diffusion import build_text_model
        model = nnx.eval_shape(lambda: build_text_model(config))
    else:
        model = nnx.eval_shape(lambda: build_model(config, seed=config.seed))
    _, params, _ = split_model(model)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_every_shipped_config_has_an_expected_size():
    assert {"cifar10", "imagenet64", "celeba64"} <= set(_shipped())
    assert set(_shipped()) <= set(EXPECTED_PARAMS), "add the new config's expected size to EXPECTED_PARAMS"


@pytest.mark.parametrize("name", _shipped())
def test_config_builds_abstractly_with_a_sane_parameter_count(name):
    c = _load(name)
    n = _lora_param_count(c, LORA_BASE_CONFIGS[name]) if c.task == "lora" else _abstract_param_count(c)
    low, high = EXPECTED_PARAMS[name]
    assert low <= n <= high, f"{name}: {n:,} parameters, expected {low:,.0f}..{high:,.0f}"
    # the batch splits over the mesh's fixed axis and every downsampling divides the image
    assert c.train.batch_size % max(c.mesh.fsdp, 1) == 0
    net = c.autoencoder if c.task == "autoencoder" else c.model
    size = c.latent.size if c.latent.autoencoder else c.data.image_size
    assert size % 2 ** (len(net.block_out_channels) - 1) == 0


@pytest.mark.parametrize("name", _shipped())
def test_config_docstring_gives_its_command_and_runtime(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = module.__doc__ or ""
    assert f"python train.py --config configs/{name}.py --workdir runs/" in doc
    assert "not measured here" in doc or "measured" in doc


def test_dataset_layouts():
    cifar, imagenet, celeba = _load("cifar10"), _load("imagenet64"), _load("celeba64")
    assert (cifar.data.name, cifar.data.image_size, cifar.data.channels) == ("cifar10", 32, 3)
    assert cifar.data.random_flip and cifar.model.num_classes == 10 and cifar.train.label_dropout == 0.1
    assert (cifar.train.batch_size, cifar.train.steps, cifar.optim.lr) == (128, 800_000, 2e-4)
    assert (cifar.optim.warmup_steps, cifar.train.ema_decay) == (5000, 0.9999)
    assert cifar.model.down_attention == (None, "self", None, None)      # 16x16 at 32x32 input
    assert imagenet.data.name == "imagenet_resized/64x64" and imagenet.model.num_classes == 1000
    assert imagenet.mesh.fsdp > 1
    assert celeba.data.name == "celeb_a" and celeba.data.crop == "center" and celeba.data.image_size == 64
    assert celeba.model.num_classes is None and celeba.data.label_key is None

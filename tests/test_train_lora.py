"""task="lora": adapters fine-tuned on a frozen base run through train_lib (state, optimizer and checkpoints
hold only the adapters; the base is bitwise unchanged) and the errors for a run without a base."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff.train_lib import config as config_lib
from jaxdiff.train_lib import loop as train_loop
from jaxdiff.train_lib.experiment import build_experiment, restore_run

TINY = dict(model=dict(block_out_channels=(8, 16), layers_per_block=1, down_attention=(None, None),
                       mid_attention="self", norm_num_groups=4),
            train=dict(steps=2, batch_size=8, log_every=1, sample_every=0, ema_decay=0.9),
            optim=dict(lr=1e-2, warmup_steps=0, schedule="constant"),
            checkpoint=dict(every=2, keep=1, async_save=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from jaxdiff.data import build_digits
    d = tmp_path_factory.mktemp("tfds")
    build_digits(str(d), 16)
    return d


def _config(data_dir, **sections):
    c = config_lib.default_config()
    c.data.data_dir = str(data_dir)
    for section, values in {**TINY, **sections}.items():
        for k, v in values.items():
            c[section][k] = v
    return c


@pytest.mark.slow   # two training runs with checkpoints: ~40 s idle, minutes under load
def test_lora_run_trains_only_adapters_on_a_frozen_base(tmp_path, data_dir):
    base_dir, lora_dir = str(tmp_path / "base"), str(tmp_path / "lora")
    train_loop.train(_config(data_dir), base_dir)
    _, base_state, _ = restore_run(base_dir)
    base_ema = jax.device_get(base_state.ema_params)

    c = _config(data_dir, train=dict(TINY["train"], steps=3), checkpoint=dict(TINY["checkpoint"], every=3))
    c.task = "lora"
    c.lora.base, c.lora.rank, c.lora.alpha, c.lora.targets = base_dir, 2, 4.0, ("attention",)
    c.model.block_out_channels = (4, 4)       # ignored: the architecture comes from the base
    train_loop.train(c, lora_dir)
    exp, state, step = restore_run(lora_dir, task="lora")
    assert step == 3
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat}
    assert len(names) == 8 and all(n.startswith("mid_block/attentions/0/to_") and "/lora/lora_" in n for n in names)
    assert all(np.abs(v).max() > 0 for path, v in flat if "lora_b" in str(path[-1]))   # B moved off zero
    # the optimizer holds moments of the adapters only
    adapter_bytes = exp.memory["adapter_bytes"]
    assert adapter_bytes == sum(v.nbytes for _, v in flat)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.nbytes for x in moments) == 2 * adapter_bytes
    assert exp.memory["base_bytes"] > 50 * adapter_bytes
    # the frozen base is bitwise the base run's EMA parameters, and the base run's checkpoint is untouched
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exp.base_params), base_ema)
    _, again, _ = restore_run(base_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.ema_params), base_ema)
    # the adapted model samples
    model = exp.sampling_model(state.ema_params)
    x = np.zeros((2, 16, 16, 1), np.float32)
    out = model.apply(model.params, x, np.full((2,), 0.5, np.float32), np.array([1, 2]))
    assert out.shape == (2, 16, 16, 1) and np.isfinite(out).all()


def test_lora_run_without_a_base_or_with_bad_targets_fails_first(tmp_path, data_dir):
    c = _config(data_dir)
    c.task = "lora"
    with pytest.raises(ValueError, match="needs a frozen base: set config key 'lora.base'"):
        config_lib.validate(c)
    c.lora.base = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a folder"):
        build_experiment(c, None)
    c.lora.base, c.lora.rank = str(tmp_path), 0
    with pytest.raises(ValueError, match="rank must be an integer"):
        config_lib.validate(c)

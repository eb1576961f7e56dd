"""Cascade on the embedded digits, stage 2: super-resolution 16x16 -> 32x32 (on digits/32), class-conditional,
Gaussian conditioning augmentation s ~ U[0, 0.5]; the third stage after configs/cascade_digits_base8.py and
configs/cascade_digits_sr16.py.

    python train.py --config configs/cascade_digits_sr32.py --workdir runs/cascade_sr32
    python sample.py --cascade runs/cascade_base8,runs/cascade_sr16,runs/cascade_sr32 --stage steps=20 \\
        --stage steps=20,aug_level=0.2 --stage steps=20,aug_level=0.2 --eval digits

Runtime: not measured here (the shared 2-core machine had no time left for a 32x32 stage); per step about
4x the 16x16 stage (four times the pixels, the same UNet). Checked by tests/test_configs.py (it builds).
"""
from jaxdiff.train_lib.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.data.name = "digits/32"
    c.data.image_size = 32
    c.data.channels = 1
    c.data.random_flip = False
    c.cascade.low_res_size = 16
    c.cascade.aug_min = 0.0
    c.cascade.aug_max = 0.0 if arg == "noaug" else 0.5
    c.process.name = "vp_cosine"
    c.loss.target = "v"
    c.model.block_out_channels = (16, 32, 32)
    c.model.layers_per_block = 1
    c.model.down_attention = (None, None, None)
    c.model.mid_attention = "self"
    c.model.norm_num_groups = 8
    c.model.num_classes = 10
    c.train.steps = 1000
    c.train.batch_size = 64
    c.train.label_dropout = 0.1
    c.train.log_every = 100
    c.train.sample_every = 0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.checkpoint.every = 500
    if arg not in (None, "", "noaug"):
        raise ValueError(f"cascade_digits_sr32 takes no argument or 'noaug', got {arg!r}")
    return c

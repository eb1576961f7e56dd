"""Cascade on the embedded digits, stage 0: a class-conditional base model at 8x8 (the 16x16 digits resized
to 8x8 by the data pipeline's bicubic resize, which jaxdiff.cascade.downsample reproduces).

    python train.py --config configs/cascade_digits_base8.py --workdir runs/cascade_base8
    python train.py --config configs/cascade_digits_sr16.py --workdir runs/cascade_sr16
    python sample.py --cascade runs/cascade_base8,runs/cascade_sr16 --stage steps=20 \\
        --stage steps=20,aug_level=0.2 --eval digits

Runtime, measured on the shared 2-core CPU machine under heavy load from other jobs (load average 15-30),
2026-11-30: 1,000 steps at batch 64 in 762 s (seed 0) and 585 s (seed 1), 1.3 GFLOP/step (XLA's estimate);
the 8x8 stage costs about a quarter of a 16x16 step. Results: benchmarks/results/cascade.md.
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.data.name = "digits/16"
    c.data.image_size = 8
    c.data.crop = "resize"
    c.data.channels = 1
    c.data.random_flip = False
    c.process.name = "vp_cosine"
    c.loss.target = "v"
    c.model.block_out_channels = (16, 32)
    c.model.layers_per_block = 1
    c.model.down_attention = (None, "self")
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
    return c

"""Unconditional CelebA faces at 64x64 with a DDPM-style UNet (68.8M parameters).

    python train.py --config configs/celeba64.py --workdir runs/celeba64

Data: TFDS ``celeb_a`` (train split, 162,770 aligned 218x178 faces), prepared beforehand as
array_record (train.py downloads nothing); the central 178x178 square is cut out and resized to 64x64
(DDPM/DDIM's CelebA preprocessing), with random horizontal flips. No labels: ``model.num_classes=None``
and ``data.label_key=None``, so the model is unconditional and label dropout does not apply.
Model: channels (128, 256, 256, 512), two residual blocks per level, self-attention at 16x16 and in the
middle. eps prediction on the linear DDPM schedule; AdamW lr 2e-4, 5,000 warmup steps,
constant; EMA 0.9999; global batch 128 for 500,000 steps.
Dropout 0.1 in the residual blocks, as published.

Runtime: not measured here (a GPU/TPU job). XLA's estimate is 19 TFLOP per step at batch 128
(151 GFLOP per image, 4x the pixels of configs/cifar10.py; benchmarks/results/train_throughput.md),
9.7e18 FLOP for the 500k steps: about 2-5 days on one A100-class GPU sustaining 25-50 TFLOP/s (an
estimate, not a measurement).
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.data.name = "celeb_a"
    c.data.split = "train"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.crop = "center"           # 178x178 centre square, resized to 64x64
    c.data.random_flip = True
    c.data.label_key = None          # unconditional
    c.process.name = "vp_linear"
    c.loss.target = "eps"
    c.model.block_out_channels = (128, 256, 256, 512)
    c.model.layers_per_block = 2
    c.model.down_attention = (None, None, "self", None)   # resolutions 64, 32, 16, 8: attention at 16x16
    c.model.down_heads = 1
    c.model.mid_attention = "self"
    c.model.norm_num_groups = 32
    c.model.dropout = 0.1
    c.model.num_classes = None       # unconditional
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.schedule = "constant"
    c.optim.clip_norm = 1.0
    c.train.steps = 500_000
    c.train.batch_size = 128
    c.train.label_dropout = 0.0
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.sample_every = 10_000
    c.checkpoint.every = 10_000
    c.checkpoint.keep = 3
    c.sample.num = 64
    return c

"""Class-conditional CIFAR-10 at 32x32 with a DDPM-sized UNet (35.75M parameters; Ho et al. 2020: 35.7M).

    python train.py --config configs/cifar10.py --workdir runs/cifar10

Data: TFDS ``cifar10`` (train split, 50,000 images of 32x32x3, labels 0-9), prepared beforehand as
array_record: ``tfds build cifar10 --file_format=array_record`` (nothing is downloaded by train.py);
random horizontal flips. Model: DDPM's CIFAR-10 UNet -- channels (128, 256, 256, 256), two residual
blocks per level, self-attention at 16x16 and in the middle -- plus a class embedding
with a null class (labels dropped 10% of the time, for classifier-free guidance). eps prediction on
DDPM's linear beta schedule; AdamW lr 2e-4 with 5,000 warmup steps then constant, gradient clipping
at 1, EMA 0.9999; global batch 128 for 800,000 steps (DDPM's recipe).
Dropout 0.1 in the residual blocks, as published.

Runtime: not measured here (a GPU/TPU job). Measured on this repository's shared 2-core CPU machine:
7.6 s per step at a reduced batch of 16 (benchmarks/results/train_throughput.md). XLA's estimate is
4.6 TFLOP per step at batch 128 (36 GFLOP per image), 3.7e18 FLOP for the 800k steps: about 1-2 days
on one A100-class GPU sustaining 25-50 TFLOP/s (an estimate, not a measurement).
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.data.name = "cifar10"
    c.data.split = "train"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.crop = "resize"           # 32x32 already: the identity
    c.data.random_flip = True
    c.data.label_key = "label"
    c.process.name = "vp_linear"     # DDPM betas 1e-4 .. 0.02, 1000 steps
    c.loss.target = "eps"
    c.model.block_out_channels = (128, 256, 256, 256)
    c.model.layers_per_block = 2
    c.model.down_attention = (None, "self", None, None)   # resolutions 32, 16, 8, 4: attention at 16x16
    c.model.down_heads = 1
    c.model.mid_attention = "self"
    c.model.norm_num_groups = 32
    c.model.dropout = 0.1
    c.model.num_classes = 10
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.schedule = "constant"
    c.optim.clip_norm = 1.0
    c.optim.weight_decay = 0.0
    c.train.steps = 800_000
    c.train.batch_size = 128
    c.train.label_dropout = 0.1
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.sample_every = 10_000
    c.checkpoint.every = 10_000
    c.checkpoint.keep = 3
    c.sample.num = 100               # a 10x10 grid, one class per row
    c.sample.guidance_scale = None
    return c

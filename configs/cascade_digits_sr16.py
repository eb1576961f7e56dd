"""Cascade on the embedded digits, stage 1: super-resolution 8x8 -> 16x16, class-conditional, with Gaussian
noise-conditioning augmentation. The 8x8 input is the batch downsampled inside the train step
(jaxdiff.cascade.downsample), corrupted at a level s ~ U[0, 0.5] per example (vp_cosine times; sigma(0.5) =
0.71), upsampled and concatenated to the noisy 16x16 input; s is embedded like the time.

    python train.py --config configs/cascade_digits_sr16.py --workdir runs/cascade_sr16
    python train.py --config configs/cascade_digits_sr16.py:noaug --workdir runs/cascade_sr16_noaug  # s = 0

The argument ``noaug`` trains without augmentation (the ablation of benchmarks/cascade.py).
Runtime, measured on the shared 2-core CPU machine under heavy load from other jobs (load average 25-35),
2026-11-30: 400 steps (benchmarks/cascade.py's override of train.steps) in 1,216 s and 1,226 s (seeds 0, 1),
6 min of it compiling; 5.35 GFLOP/step (XLA's estimate), 0.6-0.7 steps/s. The full 1,000 steps were not run
here. Results: benchmarks/results/cascade.md.
"""
from jaxdiff.train_lib.config import default_config


def get_config(arg: str | None = None):
    c = default_config()
    c.data.name = "digits/16"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.random_flip = False
    c.cascade.low_res_size = 8
    c.cascade.aug_min = 0.0
    c.cascade.aug_max = 0.0 if arg == "noaug" else 0.5
    c.process.name = "vp_cosine"
    c.loss.target = "v"
    c.model.block_out_channels = (16, 32, 32)
    c.model.layers_per_block = 1
    c.model.down_attention = (None, None, "self")
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
        raise ValueError(f"cascade_digits_sr16 takes no argument or 'noaug', got {arg!r}")
    return c

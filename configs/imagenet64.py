"""Class-conditional ImageNet 64x64 with an ADM-like UNet (277M parameters; ADM: 296M), sharded over an fsdp axis.

    python train.py --config configs/imagenet64.py --workdir runs/imagenet64

Data: TFDS ``imagenet_resized/64x64`` (train split, 1,281,167 images already 64x64x3, 1,000 classes),
prepared beforehand as array_record (ImageNet needs a manual download; train.py downloads nothing);
random horizontal flips. Model after Dhariwal & Nichol (2021)'s ImageNet-64 network: channels
(192, 384, 576, 768), three residual blocks per level, scale-shift (AdaGN) time/class conditioning,
self-attention at 32x32, 16x16 and 8x8 and in the middle (4 heads), 1,000 classes plus
a null class (labels dropped 10% of the time for classifier-free guidance). bfloat16 compute with
float32 parameters, rematerialised blocks. eps prediction on the cosine schedule (ADM's); AdamW lr
1e-4, 1,000 warmup steps, constant; EMA 0.9999; global batch 2048 for 540,000 steps.
Dropout 0.1 in the residual blocks, as published.

Mesh: ``fsdp=4`` splits parameters, gradients and AdamW moments over groups of 4 devices (fits a
v4-8 host or 4/8 GPUs per host); ``data=-1`` takes the rest. The device count must divide by 4
(override ``--config.mesh.fsdp=8`` on 8-device hosts if memory is tight).

Runtime: not measured here (needs accelerators). XLA's estimate is 1.4 PFLOP per step at batch 2048
(685 GFLOP per image, rematerialisation included; benchmarks/results/train_throughput.md), 7.6e20 FLOP
for the 540k steps: about 3 days on 8 H100s at 40% of their bf16 peak (an estimate, not a measurement).
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.data.name = "imagenet_resized/64x64"
    c.data.split = "train"
    c.data.image_size = 64
    c.data.channels = 3
    c.data.crop = "resize"           # already 64x64: the identity
    c.data.random_flip = True
    c.data.label_key = "label"
    c.process.name = "vp_cosine"
    c.loss.target = "eps"
    c.model.block_out_channels = (192, 384, 576, 768)
    c.model.layers_per_block = 3
    c.model.down_attention = (None, "self", "self", "self")   # resolutions 64, 32, 16, 8
    c.model.down_heads = 4
    c.model.mid_attention = "self"
    c.model.norm_num_groups = 32
    c.model.resnet_time_scale_shift = "scale_shift"
    c.model.dropout = 0.1
    c.model.num_classes = 1000
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.schedule = "constant"
    c.optim.clip_norm = 1.0
    c.train.steps = 540_000
    c.train.batch_size = 2048
    c.train.label_dropout = 0.1
    c.train.ema_decay = 0.9999
    c.train.log_every = 100
    c.train.sample_every = 20_000
    c.checkpoint.every = 5_000
    c.checkpoint.keep = 3
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.sample.num = 64
    c.sample.guidance_scale = 1.5
    return c

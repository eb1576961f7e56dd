"""An f4 KL autoencoder on 32x32 crops of scikit-learn's two sample photographs (embedded, no download).

    python train.py --config configs/ae_photos.py --workdir runs/ae_photos

Same recipe as configs/ae_digits.py on 3-channel natural images: 6,100 stride-8 training crops, 104
held-out crops (the photos' right 128 columns). Runtime on 2 CPU cores: measured in docs/autoencoders.md.
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.task = "autoencoder"
    c.data.name = "photo_crops/32"
    c.data.image_size = 32
    c.data.channels = 3
    c.data.random_flip = True
    c.data.label_key = None
    c.autoencoder.kind = "kl"
    c.autoencoder.block_out_channels = (32, 64, 64)
    c.autoencoder.layers_per_block = 1
    c.autoencoder.latent_channels = 4
    c.autoencoder.norm_num_groups = 8
    c.autoencoder.perceptual_weight = 1.0
    c.autoencoder.disc_start = 1000
    c.autoencoder.disc_weight = 0.5
    c.autoencoder.disc_channels = 32
    c.autoencoder.disc_layers = 2
    c.model.num_classes = None
    c.optim.lr = 1e-3
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.warmup_steps = 100
    c.train.steps = 2000
    c.train.batch_size = 32
    c.train.label_dropout = 0.0
    c.train.log_every = 100
    c.train.sample_every = 1000
    c.checkpoint.every = 500
    return c

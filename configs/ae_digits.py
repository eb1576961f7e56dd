"""First stage of latent diffusion: an f4 KL autoencoder on the embedded 32x32 digits.

    python train.py --config configs/ae_digits.py --workdir runs/ae_digits

Encodes 32x32x1 digits to 8x8x3 latents (AutoencoderKL, channels 32/64/64, one residual block per level),
trained with the CompVis recipe: L1 reconstruction + 1e-6 KL, a patch-GAN discriminator (hinge loss,
adaptive weight 0.5) switched on at step 600 of 1,200, Adam (0.5, 0.9). The LPIPS term is on when its weights
are on disk ($JAXDIFF_LPIPS_WEIGHTS; never downloaded), otherwise a warning says it is off. At the end the
latent scale factor (1 / std of the latents) is measured on 1,024 training images and written to
runs/ae_digits/latent_scale.json. 1,200 steps: 13.5 min on 2 CPU cores (1.55 steps/s); held-out PSNR
43.7 dB (docs/autoencoders.md).
"""
from jaxdiff.train_lib.config import default_config


def get_config():
    c = default_config()
    c.task = "autoencoder"
    c.data.name = "digits/32"
    c.data.image_size = 32
    c.data.channels = 1
    c.data.random_flip = False
    c.data.label_key = None
    c.autoencoder.kind = "kl"
    c.autoencoder.block_out_channels = (32, 64, 64)
    c.autoencoder.layers_per_block = 1
    c.autoencoder.latent_channels = 3
    c.autoencoder.norm_num_groups = 8
    c.autoencoder.perceptual_weight = 1.0
    c.autoencoder.disc_start = 600
    c.autoencoder.disc_weight = 0.5
    c.autoencoder.disc_channels = 32
    c.autoencoder.disc_layers = 2
    c.model.num_classes = None
    c.optim.lr = 1e-3
    c.optim.b1 = 0.5
    c.optim.b2 = 0.9
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.label_dropout = 0.0
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.sample_every = 600
    c.checkpoint.every = 500
    return c

"""An f4 KL autoencoder on 32x32 crops of scikit-learn's two sample photographs (embedded, no download).

    python train.py --config configs/ae_photos.py --workdir runs/ae_photos

configs/ae_digits.py's recipe on 3-channel natural images, with 4 latent channels and random flips: 6,100
stride-8 training crops, 104 held-out crops (the photos' right 128 columns). 1,200 steps at 1.46 steps/s
on 2 CPU cores (about 14 min when measured alone); held-out PSNR 30.2 dB (docs/autoencoders.md).
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ae_digits.py")
    spec = importlib.util.spec_from_file_location("ae_digits_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.name = "photo_crops/32"
    c.data.channels = 3
    c.data.random_flip = True
    c.autoencoder.latent_channels = 4
    return c

"""SADM (structure-guided adversarial training, our reading; docs/sadm.md) on the embedded 16x16 digits:
the digits demo's UNet and recipe, plus a structure discriminator (a PatchGAN encoder) trained against it.

    python train.py --config configs/sadm_digits.py --workdir runs/sadm_digits

The same run with ``--config.sadm.weight=0`` is the DSM-only baseline at equal steps (the discriminator is
then neither run nor updated). Runtime, measured on the shared 2-core CPU machine under heavy load (load average
20-29 from other jobs, 2026-11-30, cold compilation cache): 1,812 s for the weight-0 arm, 1,008 s at weight
0.1 and 635 s at weight 0.01 (this config); the load fell between the runs, so these times do not compare the
steps' costs (the digits demo runs at 6-7 steps/s on a quieter machine). Measured quality:
benchmarks/results/sadm.md (SADM did not beat the weight-0 arm here).
Sample and score like any diffusion run:
    python sample.py --workdir runs/sadm_digits --steps 20 --num 500 --eval digits
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
    spec = importlib.util.spec_from_file_location("digits_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()          # the demo's data, model, process and optimizer: SADM adds its discriminator
    c.task = "sadm"
    c.sadm.weight = 0.01             # 0.1 outweighs the denoising loss here (benchmarks/results/sadm.md)
    c.sadm.temperature = 0.1
    c.sadm.start = 100               # after the learning-rate warm-up
    c.sadm.disc_channels = 16
    c.sadm.disc_layers = 1           # 16x16 -> 6x6 patch logits = 36 features
    return c

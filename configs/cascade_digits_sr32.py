"""Cascade on the embedded digits, stage 2: super-resolution 16x16 -> 32x32 (on digits/32), class-conditional,
Gaussian conditioning augmentation s ~ U[0, 0.5]; the third stage after configs/cascade_digits_base8.py and
configs/cascade_digits_sr16.py.

    python train.py --config configs/cascade_digits_sr32.py --workdir runs/cascade_sr32
    python sample.py --cascade runs/cascade_base8,runs/cascade_sr16,runs/cascade_sr32 --stage steps=20 \\
        --stage steps=20,aug_level=0.2 --stage steps=20,aug_level=0.2 --eval digits

Runtime: not measured here (the shared 2-core machine had no time left for a 32x32 stage); per step about
4x the 16x16 stage (four times the pixels, the same UNet). Checked by tests/test_configs.py (it builds).
"""
import importlib.util
import os


def get_config(arg: str | None = None):
    if arg not in (None, "", "noaug"):
        raise ValueError(f"cascade_digits_sr32 takes no argument or 'noaug', got {arg!r}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cascade_digits_sr16.py")
    spec = importlib.util.spec_from_file_location("cascade_digits_sr16_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)              # the 8 -> 16 stage's model, process and optimizer, one level up
    c.data.name = "digits/32"
    c.data.image_size = 32
    c.cascade.low_res_size = 16
    c.model.down_attention = (None, None, None)
    c.model.mid_attention = "self"
    return c

"""Latent diffusion, first stage: reconstruction quality of trained autoencoders on held-out images.

    python train.py --config configs/ae_digits.py --workdir runs/ae_digits
    python benchmarks/ldm.py --autoencoder digits=runs/ae_digits

For each ``name=workdir`` (a ``task="autoencoder"`` run), encodes and decodes the held-out split of its
dataset with the EMA parameters (posterior mode) and reports PSNR and SSIM (data range [-1, 1], 11x11
Gaussian window) and the stored latent scale factor. Writes benchmarks/results/ldm.{md,json}.
(The latent diffusion model's part of this benchmark is not written yet: see docs/autoencoders.md.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdiff.data.pipeline import open_source  # noqa: E402
from jaxdiff.metrics.image_quality import psnr, ssim  # noqa: E402
from jaxdiff.parallel import make_mesh  # noqa: E402
from jaxdiff.train_lib import checkpoint as ckpt  # noqa: E402
from jaxdiff.train_lib import config as config_lib  # noqa: E402
from jaxdiff.train_lib.experiment import build_experiment  # noqa: E402


def load_autoencoder_run(workdir: str):
    """``(experiment, state, step)`` of the newest checkpoint of an autoencoder run."""
    reader = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        steps = reader.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        config = config_lib.config_from_dict(reader.read_config(steps[-1]))
        if config.task != "autoencoder":
            raise ValueError(f"{workdir} is a {config.task!r} run, not an autoencoder")
        exp = build_experiment(config, make_mesh(1, 1, jax.devices()[:1]))
        step, state, _, _ = reader.restore(exp.abstract_sharded_state())
    finally:
        reader.close()
    return exp, state, step


def held_out_images(config, split: str) -> np.ndarray:
    """All images of ``split`` in [-1, 1], ``(N, H, W, C)`` float32 (no augmentation)."""
    source = open_source(config.data.name, split, config.data.data_dir)
    x = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    return x.astype(np.float32) / 127.5 - 1.0


def evaluate(name: str, workdir: str, split: str, batch: int = 120) -> dict:
    exp, state, step = load_autoencoder_run(workdir)
    images = held_out_images(exp.config, split)
    recon = jax.jit(lambda p, x: exp.ae_apply(p, x, None)[0])
    t0 = time.perf_counter()
    out = np.concatenate([np.asarray(recon(state.ema_params, jnp.asarray(images[i:i + batch])))
                          for i in range(0, len(images), batch)])
    seconds = time.perf_counter() - t0
    p, s = np.asarray(psnr(images, np.clip(out, -1, 1))), np.asarray(ssim(images, np.clip(out, -1, 1)))
    scale_path = os.path.join(workdir, "latent_scale.json")
    scale = json.load(open(scale_path))["scale_factor"] if os.path.exists(scale_path) else None
    a = exp.config.autoencoder
    return {"name": name, "workdir": os.path.relpath(os.path.abspath(workdir), ROOT), "step": step,
            "dataset": exp.config.data.name, "split": split, "num_images": len(images),
            "kind": a.kind, "f": 2 ** (len(a.block_out_channels) - 1), "latent_channels": a.latent_channels,
            "params": exp.num_params, "psnr_db": float(p.mean()), "psnr_db_min": float(p.min()),
            "ssim": float(s.mean()), "latent_scale": scale, "images_per_s": len(images) / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder", action="append", required=True, help="name=workdir (repeatable)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "ldm"))
    args = parser.parse_args()
    rows = []
    for item in args.autoencoder:
        name, _, workdir = item.partition("=")
        r = evaluate(name, workdir, args.split)
        rows.append(r)
        print(json.dumps(r), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} cores, "
            f"{jax.devices()[0].device_kind}"}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "autoencoders": rows}, f, indent=1)
    lines = ["# Latent diffusion: autoencoder reconstruction on held-out images", "",
             f"{meta['date']}, {meta['machine']}. EMA parameters, posterior mode, outputs clipped to [-1, 1]; "
             "PSNR with data range 2 (images in [-1, 1]); SSIM with an 11x11 Gaussian window (sigma 1.5).", "",
             "| autoencoder | data (split, N) | kind, f, latent ch | params | steps | PSNR dB (min) | SSIM | latent scale |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scale = "—" if r["latent_scale"] is None else f"{r['latent_scale']:.4f}"
        lines.append(f"| {r['name']} (`{r['workdir']}`) | {r['dataset']} ({r['split']}, {r['num_images']}) | "
                     f"{r['kind']}, f{r['f']}, {r['latent_channels']} | {r['params']:,} | {r['step']} | "
                     f"{r['psnr_db']:.2f} ({r['psnr_db_min']:.2f}) | {r['ssim']:.4f} | {scale} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md/.json")


if __name__ == "__main__":
    main()

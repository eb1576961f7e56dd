"""Wall time of one-device vs patch-parallel (DistriFusion) sampling on whatever devices exist (e.g. a GPU box).

    python benchmarks/distrifusion_gpu.py                          # all devices, 256x256x4 latent, 20 DDIM steps
    python benchmarks/distrifusion_gpu.py --size 128 --channels 64,128,256 --steps 10 --patches 1,2,4,8

A randomly initialised SD-style UNet (cross-attention at the lower levels; quality is not the point here,
benchmarks/distrifusion.py measures it) samples one image with a text-like context. Times one compiled call
(after a warm-up call) for: one device, then sync / displaced / naive patch parallelism for each patch count
that fits the devices, and prints a JSON line per run plus a table. With CPU host devices this measures only
overhead (they share the same cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402

from jaxdiff.nn.functional import make_apply, split_model  # noqa: E402
from jaxdiff.nn.unet import UNet, UNetConfig  # noqa: E402
from jaxdiff.noise import make_process  # noqa: E402
from jaxdiff.research.distrifusion import DistriConfig, patch_parallel_sampling_model  # noqa: E402
from jaxdiff.sampling import Sampler, SamplerSettings, SamplingModel  # noqa: E402


def build(size: int, channels: tuple, ctx_dim: int = 64):
    n = len(channels)
    cfg = UNetConfig(in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
                     down_attention=(None,) + ("cross",) * (n - 1), norm_num_groups=32, attention_head_dim=64,
                     cross_attention_dim=ctx_dim, mid_attention="cross")
    unet = UNet(cfg, rngs=nnx.Rngs(0))
    g, p, r = split_model(unet)
    params = jax.device_put(nnx.to_pure_dict(p), jax.devices()[0])
    return SamplingModel(apply=make_apply(g, r, condition="context"), params=params,
                         process=make_process("vp_scaled_linear"), prediction="eps", shape=(size, size, 4),
                         context_shape=(16, ctx_dim))


def time_call(model, steps: int, ctx, repeats: int) -> float:
    sampler = Sampler(model, SamplerSettings(solver="ddim", steps=steps))
    np.asarray(sampler(model.params, None, jax.random.key(0), context=ctx))      # compile + warm
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        np.asarray(sampler(model.params, None, jax.random.key(r), context=ctx))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="latent rows = columns")
    parser.add_argument("--channels", default="128,256,512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--patches", default="1,2,4,8", help="patch counts (1 = the one-device baseline)")
    parser.add_argument("--modes", default="sync,displaced,naive")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    model = build(args.size, tuple(int(c) for c in args.channels.split(",")))
    ctx = np.random.default_rng(0).normal(size=(1, 16, 64)).astype(np.float32)
    rows = []
    base = None
    for n in (int(p) for p in args.patches.split(",")):
        if n > jax.device_count():
            print(f"skip {n} patches: {jax.device_count()} devices", flush=True)
            continue
        for mode in (["one_device"] if n == 1 else args.modes.split(",")):
            m = model if n == 1 else patch_parallel_sampling_model(model, DistriConfig(n, mode, warmup=4))
            sec = time_call(m, args.steps, ctx, args.repeats)
            base = sec if n == 1 else base
            row = {"patches": n, "mode": mode, "seconds": sec, "speedup": (base / sec) if base else None,
                   "size": args.size, "steps": args.steps, "device": str(jax.devices()[0].device_kind)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| patches | mode | seconds | speed-up |\n|---|---|---|---|")
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"| {r['patches']} | {r['mode']} | {r['seconds']:.3f} | {speedup} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

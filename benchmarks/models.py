"""Speed of jaxdiff's Flax NNX models against diffusers (PyTorch, CPU), same machine, same run.

  (a) google/ddpm-cifar10-32 UNet architecture (random init, 35.7M params): forward at batch 8
      and 32; one training step (forward, MSE, backward, Adam) at batch 32;
  (b) Stable Diffusion v1 AutoencoderKL architecture: encode and decode of one 256x256 image and of
      a batch of 4.

Reports images/s (median of several timed repeats after warm-up), the ratio jaxdiff/PyTorch,
achieved GFLOP/s (FLOPs from XLA's cost analysis of the compiled jaxdiff function; the same count is
used for PyTorch, the architectures being identical) and the fraction of the machine's float32
matmul peak measured in the same run. Where jaxdiff is slower, a per-stage timing of the VAE
decoder is written too.

    python benchmarks/models.py            # full run  -> benchmarks/results/models.{md,json}
    python benchmarks/models.py --quick    # smoke run (batch 8 / batch 1 only, fewer repeats)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff.nn import AutoencoderConfig, AutoencoderKL, UNet  # noqa: E402
from jaxdiff.convert import unet_config_from_diffusers  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

DDPM_CIFAR10 = dict(
    _class_name="UNet2DModel", sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              latent_channels=4, norm_num_groups=32, sample_size=256)


def timeit(fn, warmup: int, repeats: int, budget_s: float = 20.0) -> list[float]:
    """Call ``fn()`` (which must block until done) ``warmup`` times, then time up to ``repeats``
    calls, stopping early (after at least 2) once ``budget_s`` seconds have been spent timing."""
    for _ in range(warmup):
        fn()
    out = []
    while len(out) < repeats and (len(out) < 2 or sum(out) < budget_s):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def compile_with_flops(jitted, *args):
    """``(compiled, flops)``: the AOT-compiled function (reused for timing, so the run compiles once)
    and its FLOPs per call from XLA's cost analysis."""
    compiled = jitted.lower(*args).compile()
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return compiled, float(ca.get("flops", float("nan")))


def matmul_peak(n: int, repeats: int) -> dict:
    """Best-of-``repeats`` float32 ``n x n`` matmul throughput (GFLOP/s) in JAX and in PyTorch."""
    import torch
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    tj = min(timeit(lambda: f(a, a).block_until_ready(), 1, repeats))
    ta_ = torch.randn(n, n)
    tt = min(timeit(lambda: torch.mm(ta_, ta_), 1, repeats))
    flops = 2.0 * n ** 3
    return {"n": n, "jax_gflops": flops / tj / 1e9, "torch_gflops": flops / tt / 1e9}


def row(name, batch, t_jax, t_torch, flops, peak):
    tj, tt = statistics.median(t_jax), statistics.median(t_torch)
    return {"case": name, "batch": batch, "jax_s": tj, "torch_s": tt,
            "jax_img_s": batch / tj, "torch_img_s": batch / tt, "ratio": tt / tj,
            "gflop_per_call": flops / 1e9, "jax_gflops": flops / tj / 1e9, "torch_gflops": flops / tt / 1e9,
            "jax_peak_frac": flops / tj / 1e9 / peak, "torch_peak_frac": flops / tt / 1e9 / peak,
            "jax_runs": t_jax, "torch_runs": t_torch}


def bench_unet(batches, train_batch, warmup, repeats, peak, log):
    import torch
    import diffusers

    torch.manual_seed(0)
    cfg = {k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}
    tm = diffusers.UNet2DModel(**cfg)
    model = UNet(unet_config_from_diffusers(DDPM_CIFAR10), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rows = []
    fwd = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t))
    for b in batches:
        rng = np.random.RandomState(b)
        x = rng.randn(b, 32, 32, 3).astype(np.float32)
        t = rng.randint(0, 1000, b).astype(np.int32)
        xj, tj_ = jnp.asarray(x), jnp.asarray(t)
        cf, flops = compile_with_flops(fwd, params, xj, tj_)
        tjax = timeit(lambda: cf(params, xj, tj_).block_until_ready(), warmup, repeats)
        xt, tt_ = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t.astype(np.int64))
        tm.eval()

        def torch_fwd():
            with torch.no_grad():
                tm(xt, tt_)
        ttorch = timeit(torch_fwd, warmup, repeats)
        rows.append(row("ddpm-cifar10 UNet forward", b, tjax, ttorch, flops, peak))
        log(rows[-1])

    if train_batch:
        b = train_batch
        tx = optax.adam(1e-4)
        opt_state = tx.init(params)

        def step(p, s, x, t, noise):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(x, t) - noise) ** 2))(p)
            upd, s = tx.update(g, s, p)
            return optax.apply_updates(p, upd), s, loss
        jstep = jax.jit(step, donate_argnums=(0, 1))
        rng = np.random.RandomState(7)
        x = jnp.asarray(rng.randn(b, 32, 32, 3).astype(np.float32))
        noise = jnp.asarray(rng.randn(b, 32, 32, 3).astype(np.float32))
        t = jnp.asarray(rng.randint(0, 1000, b).astype(np.int32))
        state = {"p": params, "s": opt_state}
        jstep, flops = compile_with_flops(jstep, params, opt_state, x, t, noise)

        def jax_step():
            state["p"], state["s"], loss = jstep(state["p"], state["s"], x, t, noise)
            loss.block_until_ready()
        tjax = timeit(jax_step, warmup, repeats)

        tm.train()
        topt = torch.optim.Adam(tm.parameters(), lr=1e-4)
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        nt = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
        tt_ = torch.from_numpy(np.asarray(t).astype(np.int64))

        def torch_step():
            topt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(tm(xt, tt_).sample, nt)
            loss.backward()
            topt.step()
        ttorch = timeit(torch_step, warmup, repeats)
        rows.append(row("ddpm-cifar10 UNet train step (fwd+MSE+bwd+Adam)", b, tjax, ttorch, flops, peak))
        log(rows[-1])
    return rows


def _vae_pair():
    import torch
    import diffusers
    torch.manual_seed(0)
    tv = diffusers.AutoencoderKL(**SD_VAE).eval()
    cfg = AutoencoderConfig(block_out_channels=SD_VAE["block_out_channels"], layers_per_block=2,
                            latent_channels=4, norm_num_groups=32)
    return tv, AutoencoderKL(cfg, rngs=nnx.Rngs(0))


def bench_vae(batches, warmup, repeats, peak, log, tv, model):
    import torch
    graphdef, params = nnx.split(model, nnx.Param)
    enc = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x).mean)
    dec = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    rows = []
    for b in batches:
        rng = np.random.RandomState(b)
        x = rng.randn(b, 256, 256, 3).astype(np.float32)
        z = rng.randn(b, 32, 32, 4).astype(np.float32)
        xj, zj = jnp.asarray(x), jnp.asarray(z)
        xt, zt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
        for name, jf, arg, tf in [
                ("SD v1 VAE encode 256x256", enc, xj, lambda: tv.encode(xt).latent_dist.mean),
                ("SD v1 VAE decode 256x256", dec, zj, lambda: tv.decode(zt).sample)]:
            cf, flops = compile_with_flops(jf, params, arg)
            tjax = timeit(lambda: cf(params, arg).block_until_ready(), warmup, repeats)

            def torch_call():
                with torch.no_grad():
                    tf()
            ttorch = timeit(torch_call, warmup, repeats)
            rows.append(row(name, b, tjax, ttorch, flops, peak))
            log(rows[-1])
    return rows


def decoder_breakdown(tv, model, repeats) -> list[dict]:
    """Per-stage time of the VAE decoder (batch 1, 32x32x4 latents), jaxdiff vs PyTorch."""
    import torch
    dec_t, dec_j = tv.decoder, model.decoder
    z = np.random.RandomState(0).randn(1, 32, 32, 4).astype(np.float32)
    stages = [("post_quant_conv + conv_in", lambda m, h: m.decoder.conv_in(m.post_quant_conv(h)),
               lambda h: dec_t.conv_in(tv.post_quant_conv(h))),
              ("mid_block (2 resnets + attention 32x32)", lambda m, h: m.decoder.mid_block(h),
               lambda h: dec_t.mid_block(h))]
    for i in range(4):
        stages.append((f"up_blocks[{i}]", (lambda i: lambda m, h: m.decoder.up_blocks[i](h))(i),
                       (lambda i: lambda h: dec_t.up_blocks[i](h))(i)))
    stages.append(("norm + conv_out", lambda m, h: m.decoder.conv_out(jax.nn.silu(m.decoder.conv_norm_out(h))),
                   lambda h: dec_t.conv_out(dec_t.conv_act(dec_t.conv_norm_out(h)))))
    hj, ht = jnp.asarray(z), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    graphdef, params = nnx.split(model, nnx.Param)
    out = []
    for name, jf, tf in stages:
        f = jax.jit(lambda p, h, jf=jf: jf(nnx.merge(graphdef, p), h))
        tj = statistics.median(timeit(lambda: f(params, hj).block_until_ready(), 1, repeats))
        with torch.no_grad():
            tt = statistics.median(timeit(lambda: tf(ht), 1, repeats))
            ht_next = tf(ht)
        hj_next = f(params, hj)
        out.append({"stage": name, "out_shape_nhwc": list(hj_next.shape), "jax_s": tj, "torch_s": tt,
                    "ratio": tt / tj})
        hj, ht = hj_next, ht_next
    return out


def write_results(res: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "models.json"), "w") as f:
        json.dump(res, f, indent=1)
    m = res["machine"]
    lines = ["# jaxdiff models vs diffusers (PyTorch) on CPU", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; load average at start {m['loadavg_start']}, "
             f"at end {m['loadavg_end']} (the machine is shared: other processes may have been running). "
             f"jax {m['jax']}, torch {m['torch']} ({m['torch_threads']} threads), diffusers {m['diffusers']}. "
             f"Mode: {'quick' if res['quick'] else 'full'}; {res['warmup']} warm-up call, then up to "
             f"{res['repeats']} timed calls (at least 2; fewer than {res['repeats']} once 20 s were spent), "
             f"median. Total run time {res['wall_s']:.0f} s.", "",
             f"float32 matmul peak (best of 5, {res['peak']['n']}^3): JAX {res['peak']['jax_gflops']:.1f} GFLOP/s, "
             f"PyTorch {res['peak']['torch_gflops']:.1f} GFLOP/s; peak used below = "
             f"{res['peak_gflops']:.1f} GFLOP/s.", "",
             "FLOPs per call come from XLA's cost analysis of the compiled jaxdiff function and are used for both "
             "frameworks (same architecture). Ratio = PyTorch time / jaxdiff time (> 1: jaxdiff faster).", "",
             "| case | batch | jaxdiff img/s | PyTorch img/s | ratio | GFLOP/call | jaxdiff GFLOP/s (peak frac) "
             "| PyTorch GFLOP/s (peak frac) |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['jax_img_s']:.2f} | {r['torch_img_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['gflop_per_call']:.1f} | {r['jax_gflops']:.1f} "
                     f"({r['jax_peak_frac']:.0%}) | {r['torch_gflops']:.1f} ({r['torch_peak_frac']:.0%}) |")
    if res.get("decoder_breakdown"):
        lines += ["", "## Where the time goes: VAE decoder stages (batch 1, 32x32x4 latent -> 256x256)", "",
                  "| stage | output (NHWC) | jaxdiff ms | PyTorch ms | ratio |", "|---|---|---|---|---|"]
        for s in res["decoder_breakdown"]:
            lines.append(f"| {s['stage']} | {tuple(s['out_shape_nhwc'])} | {1e3 * s['jax_s']:.1f} | "
                         f"{1e3 * s['torch_s']:.1f} | {s['ratio']:.2f} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    with open(os.path.join(RESULTS, "models.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 / batch 1 only, fewer repeats")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite models.md from models.json with the current notes (no measurement)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(os.path.join(RESULTS, "models.json")) as f:
            res = json.load(f)
        res["notes"] = [n for n in res.get("notes", []) if n.startswith("Training step vs forward")] + NOTES
        write_results(res)
        return
    import torch
    import diffusers
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    warmup, repeats = (1, 2) if args.quick else (1, 3)
    t_start = time.time()
    log = lambda r: print(f"{r['case']:52s} b={r['batch']:<3d} jax {r['jax_img_s']:8.2f} img/s  "
                          f"torch {r['torch_img_s']:8.2f} img/s  ratio {r['ratio']:.2f}  "
                          f"{r['jax_gflops']:.0f} GFLOP/s ({r['jax_peak_frac']:.0%} of peak)", flush=True)
    res = {"quick": args.quick, "warmup": warmup, "repeats": repeats,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()], "jax": jax.__version__,
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "diffusers": diffusers.__version__}}
    try:
        with open("/proc/cpuinfo") as f:
            res["machine"]["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res["peak"] = matmul_peak(2048 if args.quick else 4096, 5)
    res["peak_gflops"] = max(res["peak"]["jax_gflops"], res["peak"]["torch_gflops"])
    print("matmul peak", res["peak"], flush=True)
    rows = bench_unet([8] if args.quick else [8, 32], None if args.quick else 32, warmup, repeats,
                      res["peak_gflops"], log)
    tv, vae = _vae_pair()
    rows += bench_vae([1] if args.quick else [1, 4], warmup, repeats, res["peak_gflops"], log, tv, vae)
    res["rows"] = rows
    if any(r["ratio"] < 1.0 for r in rows if "VAE" in r["case"]):
        res["decoder_breakdown"] = decoder_breakdown(tv, vae, 3)
        for s in res["decoder_breakdown"]:
            print(f"  {s['stage']:45s} jax {1e3 * s['jax_s']:8.1f} ms  torch {1e3 * s['torch_s']:8.1f} ms", flush=True)
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = time.time() - t_start
    notes = list(NOTES)
    fwd32 = next((r for r in rows if r["case"].startswith("ddpm-cifar10 UNet forward") and r["batch"] == 32), None)
    step = next((r for r in rows if "train step" in r["case"]), None)
    if fwd32 and step:
        notes.append(f"Training step vs forward at batch 32: jaxdiff {step['jax_s']:.2f} s vs {fwd32['jax_s']:.2f} s "
                     f"(x{step['jax_s'] / fwd32['jax_s']:.1f}); PyTorch {step['torch_s']:.2f} s vs "
                     f"{fwd32['torch_s']:.2f} s (x{step['torch_s'] / fwd32['torch_s']:.1f}). The backward pass + "
                     "Adam cost is the difference.")
    res["notes"] = notes
    print(f"total {res['wall_s']:.0f} s")
    if not args.no_write:
        write_results(res)


NOTES = [
    "The machine is shared with other jobs (see the load averages): absolute numbers and ratios move by up to "
    "~2x between runs; compare rows of the same run only.",
    "Training step, where the time goes (micro-benchmarks on this machine, batch 16, 32x32x128): the forward "
    "pass runs at 55-70% of the matmul peak, the backward at about half that rate. A ResnetBlock2D gradient "
    "costs 4.8x its forward (ideal ~3x): GroupNorm+SiLU backward is memory-bound (4.5x its forward), the conv "
    "input gradient runs as fast as the forward conv, and the conv kernel gradient was then computed as kh*kw "
    "matmuls (custom_vjp in jaxdiff.nn.layers.conv2d), paying for strided input copies. Since issue 13 the default "
    "is XLA's backward-filter convolution for all but 1x1 convs (YNNPACK in jax 0.10.2; faster: "
    "benchmarks/results/train_vs_pytorch.md); the train-step row above predates that. PyTorch (oneDNN) keeps its "
    "backward closer to 2.5x its forward.",
    "VAE decoder stages: jaxdiff is faster at 32x32 and 64x64 (512 channels: mid_block, up_blocks[0]) and "
    "about at par to 10% slower at 128x128 and 256x256 (up_blocks[1], up_blocks[2]: large 3x3 convs, where "
    "XLA:CPU's convolution is slower than oneDNN's); up_blocks[3] went either way between runs.",
]

if __name__ == "__main__":
    main()

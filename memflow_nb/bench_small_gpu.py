"""The full-size pipeline inside a small card's memory, emulated on a big GPU (BENCHMARKS.md, "Small GPUs").

    python -m memflow_nb.fake_weights /tmp/mf --device cuda          # real-layout files, random weights
    python -m memflow_nb.bench_small_gpu --files /tmp/mf --gpu t4,l4,24gb --sizes 480x832,320x576

Each (card, size) runs in a fresh process that sees only the card's memory
(`torch.cuda.set_per_process_memory_fraction`) and plans for the card (`load(hardware=...)`, which
also picks the card's dtype: fp16 below capability 8.0). It loads from the files, encodes a
six-prompt timeline (60-120 words each), generates `--chunks` chunks through `generate` (with
`Checkpoints.auto`), and reports: whether the plan refused, time to the first decoded chunk (text
encoding included), steady frames/s, peak GPU (allocated and reserved) and peak host memory
(resident set, sampled every 20 ms) next to the plan's predictions. Host memory is measured, not
capped: a CUDA process cannot run under an address-space limit.

`--modes eager,exact,fast,fast+tae` runs the same user path after `memflow_nb.fast.optimize(pipe, mode)`
(`fast+tae`: fast mode previewing with a random full-size TAE decoder); a warm-up run of `--warm-chunks`
chunks (compilation, CUDA graphs) comes first and is reported apart. `--gpu h200` is the whole card:
    python -m memflow_nb.bench_small_gpu --files /tmp/mf --gpu h200 --sizes 480x832,320x576 --modes exact,fast,fast+tae

`--numerics` also replays the golden cases in fp16 and bf16 on the GPU against the official fp32
latents, and the umT5 golden in fp16 with Wan's overflow guard on and off.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

WORDS = ("a weathered lighthouse keeper with a grey beard and a yellow raincoat walks along a rocky shore at "
         "dusk, waves breaking on black stones, warm light from the lamp above, gulls circling, the camera "
         "follows slowly at shoulder height, wet sand reflecting the orange sky, wind pulling at his coat, "
         "distant ships on the horizon, cinematic, detailed, natural colours, soft film grain").split()


def six_prompt_timeline(chunks: int):
    """Six segments of 60-120-word prompts over `chunks` chunks (the last one takes the rest)."""
    from .timeline.model import Timeline

    segs, n = [], 6
    for i in range(n):
        words = WORDS * 3
        text = " ".join(words[i * 7: i * 7 + 60 + 12 * i])
        start, end = min(i, chunks - 1), (i + 1 if i < n - 1 else max(chunks, n))
        segs.append({"start": start, "end": end, "prompts": [{"text": text}]})
    return Timeline(segments=segs, unit="chunks")


class PeakRSS:
    """Samples this process's resident set (VmRSS) and anonymous part (RssAnon) every 20 ms."""

    def __init__(self):
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0]) * 1024
        return out

    def _run(self):
        while not self._stop.is_set():
            r = self._read()
            self.peak_rss = max(self.peak_rss, r.get("VmRSS", 0))
            self.peak_anon = max(self.peak_anon, r.get("RssAnon", 0))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


MODES = ("eager", "exact", "fast", "fast+tae")


def speed_mode(pipe, mode: str):
    """`pipe` in a bench mode: as loaded (eager), or through `memflow_nb.fast.optimize`."""
    if mode == "eager":
        return pipe
    from .bench import random_module
    from .decode.tae import TAEConfig, TAEDecoder
    from .fast import optimize

    tae = None
    if mode == "fast+tae":
        p = next(pipe.model.parameters())
        tae = random_module(lambda: TAEDecoder(TAEConfig()), p.device, p.dtype, seed=2)
    return optimize(pipe, mode.removesuffix("+tae"), tae=tae)


def run_one(files: str, card: str, height: int, width: int, chunks: int, mode: str = "eager",
            warm_chunks: int = 11) -> dict:
    """One configuration, in this process (call it in a fresh one)."""
    import memflow_nb as mf
    from .hardware import PRESETS
    from .planning import PlanError

    hw = PRESETS[card]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, hw.gpu_bytes / total))
    out = {"card": card, "height": height, "width": width, "chunks": chunks, "mode": mode}
    tl = six_prompt_timeline(chunks)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        try:
            pipe = mf.load(local_dir=files, device="cuda", hardware=hw, height=height, width=width, progress=False)
        except PlanError as e:
            out.update(refused=True, message=str(e))
            return out
        torch.cuda.synchronize()
        out["load_s"] = time.perf_counter() - t0
        plan = pipe.plan
        out.update(refused=False, dtype=str(plan.dtype), text_encoder=plan.text_encoder_device,
                   vae_per_frame=plan.vae_per_frame, plan_peak_gpu_gb=plan.peak_gpu_bytes / 1e9,
                   plan_peak_host_gb=plan.peak_host_bytes / 1e9)
        pipe = speed_mode(pipe, mode)
        if mode != "eager":  # compilation and graph capture, reported apart from the timed run
            t0 = time.perf_counter()
            for _ in mf.generate(pipe, tl, seed=0, height=height, width=width, num_chunks=warm_chunks,
                                 checkpoints=mf.Checkpoints.auto(pipe), progress=False):
                pass
            torch.cuda.synchronize()
            out["warm_up_s"] = time.perf_counter() - t0
        times, frames, switched = [], [], []
        t1 = time.perf_counter()
        try:
            for ch in mf.generate(pipe, tl, seed=0, height=height, width=width, num_chunks=chunks,
                                  checkpoints=mf.Checkpoints.auto(pipe), progress=False):
                times.append(time.perf_counter())
                frames.append(ch.frames.shape[0])
                switched.append(ch.switched)
                if not bool(torch.isfinite(ch.latents).all()):
                    out["non_finite_chunk"] = ch.index
        except torch.cuda.OutOfMemoryError as e:
            out["oom"] = str(e).splitlines()[0]
        out["first_chunk_s"] = (times[0] - t1) if times else None
        if len(times) > 2:
            out["steady_fps"] = sum(frames[2:]) / (times[-1] - times[1])
            # Chunks where the prompt switches also re-cache the context: the rest, apart.
            calm = [i for i in range(2, len(times)) if not switched[i]]
            out["fps_between_switches"] = sum(frames[i] for i in calm) / sum(times[i] - times[i - 1] for i in calm)
            out["slowest_chunk_s"] = max(b - a for a, b in zip(times[1:], times[2:]))
    out["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    out["peak_host_rss_gb"] = rss.peak_rss / 1e9
    out["peak_host_anon_gb"] = rss.peak_anon / 1e9
    return out


def numerics(data: Path) -> list[dict]:
    """Goldens in fp16 / bf16 on the GPU against the official fp32 latents; umT5 in fp16, guard on/off."""
    from . import text_encoder as te
    from .testing import load_golden, run_golden

    rows = []
    for case in sorted(data.glob("dit_*.safetensors")) + sorted(data.glob("single_*.safetensors")):
        _, t = load_golden(case)
        ref = t["latents"].double()
        for dtype in (torch.float16, torch.bfloat16):
            got = run_golden(case, device="cuda", dtype=dtype).double()
            d = (got - ref).abs()
            rows.append({"case": case.stem, "dtype": str(dtype), "max_abs_diff": float(d.max()),
                         "mean_abs_diff": float(d.mean()), "finite": bool(torch.isfinite(got).all()),
                         "cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))})
    t5 = data / "t5.safetensors"
    if t5.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .weights import build_assigned, recipe_weights

        g = load_file(str(t5))
        with safe_open(str(t5), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        shapes = json.loads((data / "recipe_keys.json").read_text())["t5"]
        cfg = te.T5Config.from_dict(meta["config"])
        sd = {k: v.to(torch.float16) for k, v in recipe_weights(shapes, meta["weight_seed"]).items()}
        enc = build_assigned(lambda: te.UMT5Encoder(cfg), sd, device="cuda").eval()
        guard = te._clamp_fp16
        for on in (True, False):
            te._clamp_fp16 = guard if on else (lambda x: x)  # this script only: the guard off, to compare
            try:
                with torch.no_grad():
                    h = enc(g["ids"].cuda(), g["mask"].cuda()).double().cpu()
            finally:
                te._clamp_fp16 = guard
            m = g["mask"].bool()
            d = (h - g["hidden"].double()).abs()[m]
            rows.append({"case": "t5", "dtype": "torch.float16", "guard": on, "finite": bool(torch.isfinite(h).all()),
                         "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m memflow_nb.bench_small_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", required=True, help="folder made by python -m memflow_nb.fake_weights")
    p.add_argument("--gpu", default="t4,l4,24gb", help="cards of memflow_nb.hardware.PRESETS")
    p.add_argument("--sizes", default="480x832,320x576", help="HEIGHTxWIDTH,...")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--modes", default="eager", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--warm-chunks", type=int, default=11,
                   help="untimed chunks first in modes other than eager (11: bank full, every pass shape captured)")
    p.add_argument("--numerics", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--one", help=argparse.SUPPRESS)  # card:HxW, run in this process (the child)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown {unknown}; use {', '.join(MODES)}")
    if args.one:
        card, size, mode = args.one.split(":")
        h, w = (int(v) for v in size.split("x"))
        print("RESULT " + json.dumps(run_one(args.files, card, h, w, args.chunks, mode, args.warm_chunks)), flush=True)
        return 0
    results = []
    for card in args.gpu.split(","):
        for size in args.sizes.split(","):
            for mode in modes:
                cmd = [sys.executable, "-m", "memflow_nb.bench_small_gpu", "--files", args.files, "--chunks",
                       str(args.chunks), "--warm-chunks", str(args.warm_chunks), "--one", f"{card}:{size}:{mode}"]
                r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
                row = json.loads(lines[-1][7:]) if lines else {"card": card, "size": size, "mode": mode,
                                                                "error": r.stderr[-2000:]}
                print(json.dumps(row), flush=True)
                results.append(row)
                if args.json:
                    args.json.write_text(json.dumps({"runs": results}, indent=1))
    out = {"runs": results}
    if args.numerics:
        out["numerics"] = numerics(Path(__file__).resolve().parent.parent / "tests" / "data")
        for row in out["numerics"]:
            print(json.dumps(row), flush=True)
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out["torch"] = torch.__version__
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed of the full-size MemFlow model with random weights (no download): `python -m memflow_nb.bench`.

Prints one JSON object: per resolution and mode, diffusion-only FPS, end-to-end FPS (with the
streaming Wan VAE decode), first-chunk latency (prompt embeddings to first frames on the host),
ms per DiT pass, peak GPU memory. Frames are video frames: a chunk of 3 latent frames makes 12
(the first chunk 9). Warm-up and compilation are excluded; times come from CUDA events.

Modes:
  eager  the engine as is (bf16, PyTorch's default attention kernel choice);
  exact  same numbers as eager up to bf16 rounding: compiled blocks, cuDNN attention first;
  fast   exact + SMA + fp8 (e4m3, row-wise scaled) linear layers in the blocks.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import torch

from .decode import decode_chunk, init_decode_state, to_uint8
from .decode.vae import VAEConfig, WanVAEDecoder
from .engine.config import ModelConfig, StreamConfig
from .engine.context import PassAttention, Workspace
from .engine.model import CausalWanModel
from .engine.steps import init_state, step, update_memory
from .timeline.clock import frames_in_chunk, frames_of_chunks


def random_module(build_fn, device, dtype, seed: int = 0):
    """The golden recipe's random weights (memflow_nb.weights.build.random_module) on the device."""
    from .weights.build import random_module as recipe_module

    return recipe_module(build_fn, seed, device=device, dtype=dtype)


class _Timer:
    def __init__(self):
        self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self):
        self.a.record()
        return self

    def __exit__(self, *exc):
        self.b.record()
        torch.cuda.synchronize()
        self.ms = self.a.elapsed_time(self.b)


def bench_case(model, vae, height, width, mode, chunks, warm_chunks, prompt, vae_per_frame=False):
    stream = StreamConfig(sma=mode == "fast")
    out = {"height": height, "width": width, "mode": mode, "decoder": type(vae).__name__}
    # Video frames of the timed chunks (each timed loop makes chunks warm_chunks .. warm_chunks + chunks - 1).
    cf = stream.chunk_frames
    timed_frames = frames_of_chunks(warm_chunks + chunks, cf) - frames_of_chunks(warm_chunks, cf)
    decode = decode_chunk
    if vae_per_frame and isinstance(vae, WanVAEDecoder):
        import functools
        decode = functools.partial(decode_chunk, per_frame=True)
        out["vae_per_frame"] = True
    state = init_state(model, stream, prompt, height=height, width=width, seed=0)
    vstate = init_decode_state(vae)
    # Warm-up: compile every shape and reach the steady state (full bank, rolled window).
    for _ in range(warm_chunks):
        state, x0 = step(model, state)
        _, vstate = decode(vae, x0, vstate)
    torch.cuda.synchronize()
    s0, v0 = state, vstate
    with _Timer() as t:
        for _ in range(chunks):
            state, x0 = step(model, state)
    out["diffusion_ms_per_chunk"] = t.ms / chunks
    out["diffusion_fps"] = timed_frames / (t.ms / 1000)
    state, vstate = s0, v0
    del s0, v0  # a user holds one state; peak memory is measured that way
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with _Timer() as t:
        for _ in range(chunks):
            state, x0 = step(model, state)
            pixels, vstate = decode(vae, x0, vstate)
    out["e2e_ms_per_chunk"] = t.ms / chunks
    out["e2e_fps"] = timed_frames / (t.ms / 1000)
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    # The same with each chunk's decode on a second stream, overlapping the next chunk's DiT.
    side = torch.cuda.Stream()
    with _Timer() as t:
        for _ in range(chunks):
            state, x0 = step(model, state)
            side.wait_event(torch.cuda.current_stream().record_event())
            with torch.cuda.stream(side):
                x0.record_stream(side)
                pixels, vstate = decode(vae, x0, vstate)
        torch.cuda.current_stream().wait_stream(side)
    out["e2e_overlap_fps"] = timed_frames / (t.ms / 1000)
    with _Timer() as t:
        for _ in range(chunks):
            decode(vae, x0, vstate)
    out["vae_ms_per_chunk"] = t.ms / chunks
    # One DiT denoising pass in the steady state.
    st = update_memory(model, state)
    ws = Workspace(st, st.position, st.position + 3, recompute=False)
    x = torch.randn_like(x0)
    tt = torch.full((1, 3), 937.5, device=x.device)
    graphs = model.graphs
    if graphs is not None and graphs.usable(ws):
        graphs.prepare(ws)
        one_pass = lambda: graphs.run(ws, x, 937.5, "denoise")  # noqa: E731
    else:
        attend = PassAttention(ws, "denoise", 0, backends=model.attention_backends)
        one_pass = lambda: model(x, tt, st.text_kv, ws.rope_start, attend)  # noqa: E731
    for _ in range(2):
        one_pass()
    with _Timer() as t:
        for _ in range(10):
            one_pass()
    out["dit_pass_ms"] = t.ms / 10
    out["cuda_graphs"] = graphs is not None and graphs.usable(ws)
    # First chunk: prompt embeddings -> 9 frames on the host.
    for _ in range(2):
        with _Timer() as t:
            s = init_state(model, stream, prompt, height=height, width=width, seed=1)
            s, x0 = step(model, s)
            pixels, _ = decode(vae, x0, init_decode_state(vae))
            frames = to_uint8(pixels[0])
    out["first_chunk_ms"] = t.ms
    assert frames.shape[0] == frames_in_chunk(0, stream.chunk_frames)
    return out


def load_test(device, dtype) -> dict:
    """Full-size checkpoint load through load_dit: random base.pt + lora.pt written to disk first."""
    import os
    import tempfile

    from .weights import load_dit

    cfg = ModelConfig.from_name("wan2.1-t2v-1.3b")
    tmp = tempfile.mkdtemp()
    m = random_module(lambda: CausalWanModel(cfg), "cpu", torch.bfloat16, seed=3)
    torch.save({"generator": {"model." + k: v for k, v in m.state_dict().items()}}, f"{tmp}/base.pt")
    lora, r = {}, 256
    for i in range(cfg.num_layers):
        for name, (o, n) in {**{f"{a}.{p}": (cfg.dim, cfg.dim) for a in ("self_attn", "cross_attn") for p in "qkvo"},
                             "ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}.items():
            key = f"base_model.model.blocks.{i}.{name}"
            lora[key + ".lora_A.weight"] = torch.randn(r, n, dtype=torch.bfloat16) / n
            lora[key + ".lora_B.weight"] = torch.randn(o, r, dtype=torch.bfloat16) / r
    torch.save({"generator_lora": lora}, f"{tmp}/lora.pt")
    del m, lora
    sizes = {f: os.path.getsize(f"{tmp}/{f}") / 1e9 for f in ("base.pt", "lora.pt")}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load_dit(f"{tmp}/base.pt", f"{tmp}/lora.pt", device=device, dtype=dtype)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    out = {"load_dit_s": secs, "file_gb": sizes, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
           "params": sum(p.numel() for p in model.parameters())}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    random_module(lambda: CausalWanModel(cfg), device, dtype)
    torch.cuda.synchronize()
    out["random_build_s"] = time.perf_counter() - t0
    out["random_build_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def text_encoder_test(device) -> dict:
    from .text_encoder import T5Config, UMT5Encoder

    enc = random_module(lambda: UMT5Encoder(T5Config.from_name("umt5-xxl")), device, torch.bfloat16, seed=5)
    ids = torch.randint(3, 1000, (1, 512), device=device)
    mask = torch.zeros(1, 512, dtype=torch.long, device=device)
    mask[:, :120] = 1
    for _ in range(2):
        with _Timer() as t:
            enc(ids, mask)
    enc.to("cpu")
    torch.cuda.empty_cache()
    return {"umt5_xxl_encode_ms": t.ms, "after_offload_gpu_gb": torch.cuda.memory_allocated() / 1e9}


def golden_check(path, device) -> dict:
    """Exact mode in bf16 on the GPU against the official fp32 CPU latents of a golden file."""
    from .testing import load_golden, run_golden

    _, t = load_golden(path)
    ref = t["latents"].double()
    out = run_golden(path, device=device, dtype=torch.bfloat16, compile=True).double()
    d = (out - ref).abs()
    n = out.shape[1] // 3
    return {"golden": str(path), "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "ref_abs_mean": float(ref.abs().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)),
            "max_abs_diff_per_chunk": [round(float(d[:, 3 * i:3 * i + 3].max()), 4) for i in range(n)]}


def vae_variants(vae, height, width) -> list[dict]:
    """Time the VAE decode of one steady-state chunk (3 latent frames) several ways: eager and
    compiled (`fast.vae.CompiledVAE`, with the speed settings), in two memory formats, whole
    chunk or frame by frame; each against the eager numbers."""
    from dataclasses import replace

    from .fast import settings
    from .fast.vae import CompiledVAE

    lat = torch.randn(1, 3, 16, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    _, st = decode_chunk(vae, lat, init_decode_state(vae))
    ref, _ = decode_chunk(vae, lat, st)
    out = []
    eager_settings = replace(settings.read(), cudnn_benchmark=False)
    for name, decoder, torch_settings in (("eager", vae, eager_settings),
                                          ("compiled", CompiledVAE(vae), settings.SPEED)):
        with settings.applied(torch_settings):
            for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last_3d)):
                for per_frame in (False, True):
                    try:
                        _, st2 = decode_chunk(decoder, lat, init_decode_state(decoder), memory_format=fmt,
                                              per_frame=per_frame)
                        for _ in range(2):
                            got, _ = decode_chunk(decoder, lat, st2, memory_format=fmt, per_frame=per_frame)
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        with _Timer() as t:
                            for _ in range(3):
                                decode_chunk(decoder, lat, st2, memory_format=fmt, per_frame=per_frame)
                        row = {"size": f"{width}x{height}", "decoder": name, "format": fmt_name,
                               "per_frame": per_frame, "ms": t.ms / 3,
                               "peak_extra_gb": (torch.cuda.max_memory_allocated() - base) / 1e9,
                               "max_abs_diff_vs_eager": float((got - ref).abs().max())}
                    except Exception as e:  # report, do not abort the benchmark
                        row = {"size": f"{width}x{height}", "decoder": name, "failed": repr(e)[:300]}
                    out.append(row)
                    print(json.dumps(row), flush=True)
    return out


def profile_chunk(model, vae, height, width, mode, prompt, path=None) -> str:
    """torch.profiler over two steady-state chunks (step + decode): the top GPU and CPU ops."""
    stream = StreamConfig(sma=mode == "fast")
    state = init_state(model, stream, prompt, height=height, width=width, seed=0)
    vstate = init_decode_state(vae)
    for _ in range(12):
        state, x0 = step(model, state)
        _, vstate = decode_chunk(vae, x0, vstate)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(2):
            state, x0 = step(model, state)
            _, vstate = decode_chunk(vae, x0, vstate)
        torch.cuda.synchronize()
    if path:
        prof.export_chrome_trace(path)
    ka = prof.key_averages()
    return (ka.table(sort_by="cuda_time_total", row_limit=28, max_name_column_width=60) + "\n"
            + ka.table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))


def run_mode(args, mode: str, base, vae, prompt) -> list[dict]:
    """The cases of one mode: `base` and `vae` as they are (eager), or wrapped (exact / fast)."""
    from .fast import optimize_model
    from .fast.vae import CompiledVAE

    model, decoder = base, vae
    if mode != "eager":
        model, decoder = optimize_model(base, mode, graphs=not args.no_graphs), CompiledVAE(vae)
    if mode == "fast":  # fast mode previews with the tiny decoder
        from .decode.tae import TAEConfig, TAEDecoder

        p = next(base.parameters())
        decoder = random_module(lambda: TAEDecoder(TAEConfig()), p.device, p.dtype, seed=2)
    if args.profile:
        w, h = (int(v) for v in args.profile.split("x"))
        trace = f"{args.trace_dir}/trace_{mode}_{args.profile}.json" if args.trace_dir else None
        print(f"=== profile {mode} {args.profile}\n" + profile_chunk(model, decoder, h, w, mode, prompt, trace))
        return []
    cases = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        t0 = time.perf_counter()
        case = bench_case(model, decoder, h, w, mode, args.chunks, args.warm_chunks, prompt,
                          vae_per_frame=args.vae_per_frame)
        case["cuda_graphs_enabled"] = not args.no_graphs
        case["wall_s"] = time.perf_counter() - t0
        cases.append(case)
        print(json.dumps(case), flush=True)
    return cases


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m memflow_nb.bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="832x480,576x320", help="WxH list")
    p.add_argument("--modes", default="exact,fast", help="eager, exact, fast")
    p.add_argument("--chunks", type=int, default=8, help="timed chunks per measurement")
    p.add_argument("--warm-chunks", type=int, default=11, help="chunks run before timing (bank full at 10)")
    p.add_argument("--load-test", action="store_true", help="also time load_dit on full-size files")
    p.add_argument("--text-encoder", action="store_true", help="also time the umT5-XXL encoder")
    p.add_argument("--golden", action="append", default=[], help="also check bf16 accuracy on this golden file")
    p.add_argument("--vae-variants", action="store_true", help="also time VAE decode variants")
    p.add_argument("--no-graphs", action="store_true", help="exact/fast modes without CUDA-graph replay")
    p.add_argument("--vae-per-frame", action="store_true", help="decode one latent frame at a time (less memory)")
    p.add_argument("--profile", help="WxH: print a torch.profiler table of two chunks per mode instead of timing")
    p.add_argument("--trace-dir", help="with --profile: write chrome traces here")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python -m memflow_nb.bench " + " ".join(argv or []), "cases": []}
    if args.load_test:
        res["load"] = load_test(dev, dtype)
    if args.text_encoder:
        res["text_encoder"] = text_encoder_test(dev)
    res["accuracy"] = [golden_check(g, dev) for g in args.golden]
    for a in res["accuracy"]:
        print(json.dumps(a), flush=True)
    cfg = ModelConfig.from_name("wan2.1-t2v-1.3b")
    base = random_module(lambda: CausalWanModel(cfg), dev, dtype)
    vae = random_module(lambda: WanVAEDecoder(VAEConfig()), dev, dtype, seed=1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 512, cfg.text_dim, generator=g)
    prompt[:, 120:] = 0
    if args.vae_variants:
        res["vae"] = [v for size in args.sizes.split(",") for v in
                      vae_variants(vae, *(int(x) for x in size.split("x")[::-1]))]
    from .fast import settings

    for mode in args.modes.split(","):
        # eager: the plain model and VAE with cuDNN's autotuner off; exact / fast: the wrappers, the speed settings.
        eager = dataclasses.replace(settings.SPEED, cudnn_benchmark=False)
        with settings.applied(eager if mode == "eager" else settings.SPEED):
            res["cases"] += run_mode(args, mode, base, vae, prompt.to(dev))
        gc.collect()  # the wrappers of this mode (graphs and their memory pools) go before the next
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()

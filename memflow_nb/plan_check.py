"""Measure what `memflow_nb.plan` estimates, on this machine, with random weights.

    python -m memflow_nb.plan_check                          # full size on the GPU, 480x832 and 320x576
    python -m memflow_nb.plan_check --sizes 480x832 --dtype fp16

Prints one JSON line per piece: estimated bytes, measured bytes and their ratio. Measured are the
live tensor bytes (`State.nbytes`, the decode caches) and the peak above what was live before a
call: on CUDA `max_memory_allocated`; on the CPU the allocator's events recorded by torch.profiler
(deterministic: the same calls allocate the same bytes). tests/test_plan.py runs `measure_stream`
and `measure_vae` with the tiny model on the CPU.
"""
from __future__ import annotations

import json
import math

import torch

from . import footprint as fp
from .engine.config import StreamConfig

__all__ = ["peak_bytes", "measure_stream", "measure_vae", "measure_pipeline", "row"]


def peak_bytes(fn, device) -> tuple[object, int]:
    """(fn(), the most bytes allocated at once during fn beyond those live before it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return out, peak


def row(what: str, estimated: int, measured: int, **info) -> dict:
    return {"what": what, "estimated": int(estimated), "measured": int(measured),
            "ratio": round(estimated / measured, 3) if measured else None, **info}


def _steady_chunk(stream: StreamConfig) -> int:
    """The first chunk after which the window has rolled, the bank is full and a new record waits."""
    c = math.ceil(stream.local_attn_size / stream.chunk_frames)
    if stream.bank_size:
        c = max(c, stream.record_interval * stream.bank_size)
        c = math.ceil(c / stream.record_interval) * stream.record_interval
    return c


@torch.no_grad()
def measure_stream(model, stream: StreamConfig, height: int, width: int, prompt_embeds: torch.Tensor,
                   new_prompt: torch.Tensor) -> list[dict]:
    """Stream state, a chunk's peak (one that compresses the bank) and a prompt switch's peak, each
    measured against its estimate. prompt_embeds, new_prompt: [B, Ltxt, text_dim]."""
    from .engine.steps import init_state, set_prompt, step

    p = next(model.parameters())
    cfg, e, b = model.cfg, p.element_size(), prompt_embeds.shape[0]
    lat = (height // 8, width // 8)
    state = init_state(model, stream, prompt_embeds, height=height, width=width, seed=0)
    for _ in range(_steady_chunk(stream) + 1):
        state, x0 = step(model, state)
    del x0
    size = f"{height}x{width}"
    rows = [row("stream state", fp.stream_state_bytes(cfg, stream, lat, b, e, prompt_embeds.shape[1]),
                state.nbytes(), size=size)]
    (after, x0), chunk_peak = peak_bytes(lambda: step(model, state), p.device)
    rows.append(row("chunk (workspace + keys/values)", sum(fp.chunk_bytes(cfg, stream, lat, b, e).values()),
                    chunk_peak, size=size))
    del after, x0
    switched, switch_peak = peak_bytes(lambda: set_prompt(model, state, new_prompt), p.device)
    rows.append(row("prompt switch", fp.switch_bytes(cfg, stream, lat, b, e), switch_peak, size=size))
    return rows


@torch.no_grad()
def measure_vae(vae, latent_hw: tuple[int, int], chunk_frames: int, batch: int = 1) -> list[dict]:
    """The decode caches and a steady chunk's decode peak, whole and frame by frame."""
    from .decode import decode_chunk, init_decode_state

    p = next(vae.parameters())
    e, size = p.element_size(), f"{latent_hw[0] * 8}x{latent_hw[1] * 8}"
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, chunk_frames, vae.config.z_dim, *latent_hw, generator=g).to(p.device, p.dtype)
    _, state = decode_chunk(vae, lat, init_decode_state(vae))
    caches = sum(c.numel() * c.element_size() for c in state.caches)
    rows = [row("VAE decode state", fp.vae_cache_bytes(vae.config, latent_hw, batch, e), caches, size=size)]
    for per_frame in (False, True):
        _, peak = peak_bytes(lambda: decode_chunk(vae, lat, state, per_frame=per_frame), p.device)
        est = fp.vae_decode_bytes(vae.config, latent_hw, batch, e, chunk_frames, per_frame, p.device.type)
        rows.append(row(f"VAE decode{' per frame' if per_frame else ''}", est, peak, size=size))
    return rows


@torch.no_grad()
def measure_pipeline(model, vae, stream: StreamConfig, height: int, width: int, prompt_embeds, new_prompt) -> dict:
    """CUDA: all memory allocated at the peak of steady chunks, their decodes and a prompt switch,
    against weights + stream state + decode state + the largest phase of the plan."""
    from .engine.steps import init_state, set_prompt, step
    from .decode import decode_chunk, init_decode_state

    p = next(model.parameters())
    cfg, e, lat = model.cfg, p.element_size(), (height // 8, width // 8)
    state, vstate = init_state(model, stream, prompt_embeds, height=height, width=width, seed=0), init_decode_state(vae)
    for _ in range(_steady_chunk(stream) + 1):
        state, x0 = step(model, state)
        _, vstate = decode_chunk(vae, x0, vstate)
    del x0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for prompt in (None, new_prompt, None):
        if prompt is not None:
            state = set_prompt(model, state, prompt)
        state, x0 = step(model, state)
        _, vstate = decode_chunk(vae, x0, vstate)
        del x0
    torch.cuda.synchronize()
    phases = [sum(fp.chunk_bytes(cfg, stream, lat, 1, e).values()), fp.switch_bytes(cfg, stream, lat, 1, e),
              fp.vae_decode_bytes(vae.config, lat, 1, e, stream.chunk_frames, False, "cuda")]
    held = (fp.dit_weight_bytes(cfg, e) + fp.vae_weight_bytes(vae.config, e) + 2 * prompt_embeds.nbytes
            + fp.stream_state_bytes(cfg, stream, lat, 1, e) + fp.vae_cache_bytes(vae.config, lat, 1, e))
    return row("whole stream (allocated)", held + max(phases), torch.cuda.max_memory_allocated(),
               size=f"{height}x{width}")


def _main(argv=None) -> None:
    import argparse

    from .bench import random_module
    from .engine.config import ModelConfig
    from .engine.model import CausalWanModel
    from .precision import resolve_dtype
    from .decode.vae import VAEConfig, WanVAEDecoder

    ap = argparse.ArgumentParser(prog="python -m memflow_nb.plan_check", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="480x832,320x576", help="HEIGHTxWIDTH,...")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text-encoder", action="store_true", help="also the umT5-XXL encode peak (11.4 GB)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    cfg = ModelConfig.from_name("wan2.1-t2v-1.3b")
    model = random_module(lambda: CausalWanModel(cfg), dev, dtype)
    vae = random_module(lambda: WanVAEDecoder(VAEConfig()), dev, dtype, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dev, dtype) for _ in range(2)]
    out = []
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        out += measure_stream(model, StreamConfig(), h, w, *prompts)
        out += measure_vae(vae, (h // 8, w // 8), StreamConfig().chunk_frames)
        if dev.type == "cuda":
            out.append(measure_pipeline(model, vae, StreamConfig(), h, w, *prompts))
        for r in out[-6:]:
            print(json.dumps(r), flush=True)
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        model = random_module(lambda: CausalWanModel(cfg), dev, dtype)  # a second copy, converted
        if torch.cuda.get_device_capability(dev) >= (8, 9):
            from .fast.fp8 import to_fp8

            to_fp8(model)
            torch.cuda.synchronize()
            out.append(row("DiT weights fp8", fp.dit_weight_bytes(cfg, dtype.itemsize, True),
                           torch.cuda.memory_allocated() - base))
        del model
    if args.text_encoder:
        from .text_encoder import T5Config, UMT5Encoder

        t5 = T5Config.from_name("umt5-xxl")
        enc = random_module(lambda: UMT5Encoder(t5), dev, dtype, seed=5)
        ids = torch.randint(0, t5.vocab, (1, cfg.text_len), device=dev)
        _, peak = peak_bytes(lambda: enc(ids, torch.ones_like(ids)), dev)
        out.append(row("text encoding", fp.text_encode_bytes(t5, 1, cfg.text_len, dtype.itemsize), peak))
    print(json.dumps({"device": str(dev), "dtype": str(dtype), "rows": out}), flush=True)


if __name__ == "__main__":
    _main()

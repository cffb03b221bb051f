"""fp16 (what a T4 computes in) on the CPU: the tiny DiT and VAE stay finite.

Wan's own fp16 guard is the T5 clamp (tests/test_text_encoder.py). The DiT and the VAE get none:
ComfyUI runs the Wan2.1 DiT (fp16 listed first among its inference dtypes) and VAE in fp16 with
the same operations and no clamp, and every reduction here that could overflow fp16 already
runs in float32 (DiT RMSNorm and RoPE in float32, LayerNorm and SDPA accumulate in float32).
"""
from __future__ import annotations

import torch

from memflow_nb.engine import steps as stream
from memflow_nb.pipeline import load
from memflow_nb.decode import decode_chunk, init_decode_state


def test_tiny_pipeline_is_finite_in_fp16():
    pipe = load("tiny", device="cpu", dtype=torch.float16)
    emb = pipe.text(["a red fox trots through fresh snow"])
    assert emb.dtype == torch.float16 and bool(torch.isfinite(emb).all())
    state = stream.init_state(pipe.model, pipe.stream, emb, height=64, width=112, seed=3)
    state, x0 = stream.step(pipe.model, state)
    assert x0.dtype == torch.float16 and bool(torch.isfinite(x0).all())
    pixels, _ = decode_chunk(pipe.vae, x0, init_decode_state(pipe.vae))
    assert bool(torch.isfinite(pixels).all())
    # and fp16 computes the same thing as float32, to fp16 precision
    ref = load("tiny", device="cpu", dtype=torch.float32)
    _, x32 = stream.step(ref.model, stream.init_state(ref.model, ref.stream, ref.text([
        "a red fox trots through fresh snow"]), height=64, width=112, seed=3))
    assert (x0.float() - x32).norm() / x32.norm() < 0.05

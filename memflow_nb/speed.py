"""Speed modes for a GPU: `optimize(pipe, "exact")` or `optimize(pipe, "fast")`.

exact  the same computation as the reference, in bf16: blocks compiled with torch.compile (fused
       RoPE, modulation and norms), cuDNN attention tried first, whole DiT passes replayed as CUDA
       graphs, the attention context written once per chunk (no cache cloning), text K/V once per
       prompt, the LoRA merged at load, VAE norms fused and cuDNN's convolution autotuner on.
       Numbers differ from eager bf16 only by float rounding (fused kernels sum in another order).
fast   exact plus documented approximations: sparse memory activation (each head attends to its
       3 most relevant of the sink and bank frames), fp8 linear layers (relative error about 3e-2
       per layer), and optionally the tiny TAE decoder for previews.
"""
from __future__ import annotations

import torch

from . import model as model_mod
from .graphs import PassGraphs
from .model import compile_model
from .decode.vae import compile_vae


def optimize_model(model, mode: str = "exact", graphs: bool = True):
    """Apply a speed mode to a CausalWanModel in place (fp8 in fast mode is not undone)."""
    if mode not in ("exact", "fast"):
        raise ValueError(f"unknown mode {mode!r}; use 'exact' or 'fast'")
    if not torch.cuda.is_available():
        raise RuntimeError("speed modes need a CUDA GPU; on the CPU the eager engine is already the fast path")
    if mode == "fast":
        from .fp8 import to_fp8

        to_fp8(model)
    from torch.nn.attention import SDPBackend

    model_mod.SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compile_model(model)
    model.pass_graphs = PassGraphs(model) if graphs else None
    return model


def optimize(pipe, mode: str = "exact", graphs: bool = True, tae=None):
    """Apply a speed mode to a loaded pipeline (model, VAE, stream settings); returns it.

    graphs: replay DiT passes as CUDA graphs (a large win below 832x480, where launching kernels
        dominates; it keeps a workspace and activation pools resident, about 10 GB at 832x480;
        pass False to stay near 16 GB).
    tae: fast mode only: a TAEDecoder (`memflow_nb.weights.load_tae()`) to use for previews instead
        of the Wan VAE (25x fewer FLOPs, lower quality).
    """
    optimize_model(pipe.model, mode, graphs)
    torch.backends.cudnn.benchmark = True  # picks the fastest 3-D convolution per VAE shape
    if mode == "fast":
        pipe.stream = pipe.stream.replace(sma=True)
        if tae is not None:
            pipe.vae = tae
    if type(pipe.vae).__name__ == "WanVAEDecoder":
        compile_vae(pipe.vae)
    return pipe

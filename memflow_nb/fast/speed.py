"""Speed modes: `optimize(pipe, "exact")` or `optimize(pipe, "fast")` return a faster pipeline.

exact  the same computation as the reference, in bf16: the blocks' pieces compiled with
       torch.compile (fused RoPE, modulation and norms), cuDNN attention tried first, whole DiT
       passes replayed as CUDA graphs, the VAE decoder compiled. Numbers differ from eager bf16
       only by float rounding (fused kernels sum in another order).
fast   exact plus documented approximations: sparse memory activation (each head attends to its
       3 most relevant of the sink and bank frames), fp8 linear layers (relative error about 3e-2
       per layer), and optionally the tiny TAE decoder for previews.

Nothing is changed in place: the optimized model is a `FastModel` wrapper that holds its compiled
pieces, its CUDA graphs and its attention kernel order, and that `init_state` / `step` /
`set_prompt` / `update_memory` take in place of the model. The process-wide torch settings a
speed mode wants are in `settings.py`, with their inverse.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import settings
from .graphs import PassGraphs


class FastModel:
    """A CausalWanModel with its speed pieces (see `optimize_model`).

    States are interchangeable with the wrapped model's (same `instance_id`), and so are
    recordings: `record_attention(fast)` records the wrapped model's passes.
    """

    def __init__(self, model, pieces, attention_backends=None, graphs: bool = False):
        self.model = model
        self.pieces = tuple(pieces)  # per block: (qkv, self_out, finish), compiled
        self.attention_backends = attention_backends
        self.graphs = PassGraphs(self, attention_backends) if graphs else None

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def instance_id(self) -> str:
        return self.model.instance_id

    @property
    def observers(self):
        return self.model.observers

    def parameters(self):
        return self.model.parameters()

    def text_kv(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.text_kv(prompt_embeds)

    def __call__(self, x, t, text_kv, frame_start, attend, need_output: bool = True, rope=None):
        """The model's forward (same arguments) with the compiled block pieces."""
        return self.model(x, t, text_kv, frame_start, attend, need_output, rope, pieces=self.pieces)

    def __repr__(self) -> str:
        return (f"FastModel({type(self.model).__name__}, {len(self.pieces)} compiled blocks, "
                f"graphs={'on' if self.graphs is not None else 'off'})")


def optimize_model(model, mode: str = "exact", *, graphs: Optional[bool] = None,
                   compile_options: Optional[dict] = None) -> FastModel:
    """A `FastModel` wrapping `model` (unchanged) for a speed mode.

    graphs: replay DiT passes as CUDA graphs (default: on a CUDA model). They keep a workspace and
        activation pools resident: the peak through `generate` was 14 GB above the load-time plan at
        832x480 and 5 GB at 576x320 (H200, BENCHMARKS.md); pass False on a card without that room.
    compile_options: keyword arguments for torch.compile of each block piece (default dynamic=False).
    Applies `settings.SPEED` process-wide (see settings.py for the inverse).
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"unknown mode {mode!r}; use 'exact' or 'fast'")
    if isinstance(model, FastModel):
        raise TypeError("model is already optimized; pass the CausalWanModel it wraps (fast.model)")
    cuda = next(model.parameters()).device.type == "cuda"
    graphs = cuda if graphs is None else graphs
    if graphs and not cuda:
        raise ValueError("CUDA graphs need the model on a CUDA GPU; pass graphs=False")
    blocks = list(model.blocks)
    if mode == "fast":
        from .fp8 import fp8_blocks

        if not cuda:
            raise RuntimeError("fast mode's fp8 linears need the model on a CUDA GPU (compute capability 8.9+)")
        blocks = fp8_blocks(model)
    backends = None
    if cuda:
        from torch.nn.attention import SDPBackend

        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
    settings.apply(settings.SPEED)
    kw = {"dynamic": False, **(compile_options or {})}
    pieces = [tuple(torch.compile(piece, **kw) for piece in blk.pieces()) for blk in blocks]
    return FastModel(model, pieces, backends, graphs)


def optimize(pipe, mode: str = "exact", *, graphs: Optional[bool] = None, tae=None):
    """A new pipeline running `pipe` in a speed mode; `pipe` itself is unchanged (weights are shared).

    The model becomes a `FastModel`, the Wan VAE a compiled one (`compile_vae`), and in fast mode
    the stream settings turn SMA on.

    graphs: see `optimize_model`.
    tae: fast mode only: a TAEDecoder (`memflow_nb.weights.load_tae()`) to use for previews instead
        of the Wan VAE (25x fewer FLOPs, lower quality).
    """
    from .vae import compile_vae

    if tae is not None and mode != "fast":
        raise ValueError("tae= is for fast mode only; exact mode decodes with the Wan VAE")
    model = pipe.model.model if isinstance(pipe.model, FastModel) else pipe.model
    changes = {"model": optimize_model(model, mode, graphs=graphs)}
    changes["vae"] = tae if tae is not None else compile_vae(pipe.vae)
    if mode == "fast":
        changes["stream"] = pipe.stream.replace(sma=True)
    return dataclasses.replace(pipe, **changes)

"""Input checks of the engine, public so that the CLI and the API refuse bad input the same way."""
from __future__ import annotations

from typing import Optional

import torch

from .config import ModelConfig, StreamConfig


def check_model(model) -> None:
    """A CausalWanModel or a wrapper of one (`memflow_nb.fast.optimize_model`)."""
    if not isinstance(getattr(model, "cfg", None), ModelConfig) or not hasattr(model, "instance_id"):
        raise TypeError(f"model must be a CausalWanModel (or memflow_nb.fast's wrapper of one), "
                        f"got {type(model).__name__}")


def check_state(model, state) -> None:
    """`state` is a State made with this model instance."""
    from .state import State

    if not isinstance(state, State):
        raise TypeError(f"expected a memflow_nb State, got {type(state).__name__}")
    if getattr(model, "instance_id", None) != state.model_id:
        raise ValueError("this state was made with another model instance; states only step with "
                         "the model that created them (make a new one with init_state)")


def check_seed(seed) -> None:
    """A seed is an int in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed} is outside [0, 2**63)")


MAX_EMBED = 1e6  # umT5 outputs are layer-normed (a few hundred at most); 1e30 gives inf latents


def check_prompt_embeds(model, pe: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings [B, L <= text_len, text_dim] (or [L, text_dim]) on the model's device and dtype."""
    if not isinstance(pe, torch.Tensor):
        raise TypeError(f"prompt_embeds must be a tensor, got {type(pe).__name__}")
    if pe.dim() == 2:
        pe = pe.unsqueeze(0)
    cfg = model.cfg
    if pe.dim() != 3 or pe.shape[-1] != cfg.text_dim:
        raise ValueError(f"prompt_embeds must be [B, L, {cfg.text_dim}] for this model (text_dim={cfg.text_dim}), "
                         f"got {list(pe.shape)}")
    if pe.shape[1] > cfg.text_len:
        raise ValueError(f"prompt_embeds has {pe.shape[1]} tokens; the model takes at most text_len={cfg.text_len}")
    if not torch.isfinite(pe).all():
        raise ValueError("prompt_embeds contains NaN or inf")
    peak = pe.abs().max().item() if pe.numel() else 0.0
    if peak > MAX_EMBED:  # finite but far out of range: the model's attention would overflow to inf
        raise ValueError(f"prompt_embeds has values up to {peak:.3g}; a text encoder's outputs stay within "
                         f"±{MAX_EMBED:.0e} (were they scaled by mistake?)")
    p = next(model.parameters())
    return pe.to(p.device, p.dtype)


def stream_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw: tuple[int, int], batch: int = 1,
                 elem: int = 2) -> int:
    """Bytes a stream needs at this size: its steady state plus the larger peak of a chunk and of a
    prompt switch above it (the formulas of `memflow_nb.footprint`, which the memory plan uses)."""
    from .. import footprint as fp  # imported here: footprint reads the VAE and text-encoder configs too

    chunk = sum(fp.chunk_bytes(cfg, stream, latent_hw, batch, elem).values())
    switch = fp.switch_bytes(cfg, stream, latent_hw, batch, elem)
    return fp.stream_state_bytes(cfg, stream, latent_hw, batch, elem) + max(chunk, switch)


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device` (the GPU's, or the host's available memory); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # unknown platform: no check


def check_memory(model, stream: StreamConfig, h: int, w: int, batch: int) -> None:
    """Refuse, before allocating anything, a latent size h x w whose stream cannot fit in free memory."""
    p = next(model.parameters())
    need = stream_bytes(model.cfg, stream, (h, w), batch, p.element_size())
    free = free_bytes(p.device)
    if free is not None and need > free:
        raise ValueError(f"a {h * 8}x{w * 8} stream needs about {need / 1e9:.1f} GB for its state and its largest "
                         f"step (a chunk or a prompt switch), but only {free / 1e9:.1f} GB is free on {p.device}; "
                         f"use a smaller size")

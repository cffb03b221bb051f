"""The decoders' weights: the Wan VAE's decoder half and the TAE, encoder keys skipped.

    vae = load_vae("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", device="cuda")
    tae = load_tae(None, device="cuda", dtype=torch.float16)   # fetches lightx2v/Autoencoders/taew2_1.pth
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..decode.tae import TAEConfig, TAEDecoder
from ..decode.vae import VAEConfig, WanVAEDecoder
from .build import build_assigned, check_state_dict, meta_shapes, split_state_dict
from .download import TAE_FILENAME, TAE_REPO, fetch_tae
from .files import read_checkpoint, tensors_only

log = logging.getLogger(__name__)

__all__ = ["split_vae_state_dict", "load_vae_decoder", "load_vae", "split_tae_state_dict", "load_tae_decoder",
           "load_tae"]

VAE_ENCODER_PREFIXES = ("encoder.", "conv1.")  # keys of Wan2.1_VAE.pth that only the encoder uses
TAE_ENCODER_PREFIXES = ("encoder.",)


def _decoder_from(sd: Mapping[str, Tensor], prefixes: tuple[str, ...], build: Callable, *, source, what: str,
                  device, dtype):
    """(decoder built from the non-encoder keys, encoder keys skipped); KeyMismatch lists bad keys."""
    dec, skipped = split_state_dict(sd, prefixes)
    check_state_dict(meta_shapes(build), dec, source=source, what=what)
    return build_assigned(build, dec, device=device, dtype=dtype), skipped


def split_vae_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Full VAE state dict -> (everything but the encoder keys, sorted encoder keys dropped)."""
    return split_state_dict(sd, VAE_ENCODER_PREFIXES)


def load_vae_decoder(sd: Mapping[str, Tensor], config: VAEConfig = VAEConfig(), *, device="cpu",
                     dtype: torch.dtype = torch.float32, source="VAE state dict") -> tuple[WanVAEDecoder, list[str]]:
    """The VAE decoder from a full (or decoder-only) state dict: (decoder in eval mode without
    grads, encoder keys skipped). Raises KeyMismatch listing every missing, unexpected or
    mis-shaped key."""
    return _decoder_from(sd, VAE_ENCODER_PREFIXES, lambda: WanVAEDecoder(config), source=source,
                         what=f"VAE decoder (dim {config.dim})", device=device, dtype=dtype)


def load_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config: VAEConfig | None = None) -> WanVAEDecoder:
    """Load the decoder half of `Wan2.1_VAE.pth` (194 tensors; the 86 encoder-only ones are skipped).

    config defaults to VAEConfig() with `dim` read off `decoder.head.0.gamma` (96 for Wan2.1).
    """
    sd = tensors_only(read_checkpoint(path), path, "VAE file")
    if config is None:
        gamma = sd.get("decoder.head.0.gamma")
        config = VAEConfig(dim=gamma.shape[0]) if gamma is not None else VAEConfig()
    vae, skipped = load_vae_decoder(sd, config, device=device, dtype=dtype, source=path)
    log.info("%s: skipped %d encoder-only tensors (decoding needs conv2 and decoder.* only)", path, len(skipped))
    return vae


def split_tae_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Full TAE state dict -> (everything but the encoder keys, sorted encoder keys dropped)."""
    return split_state_dict(sd, TAE_ENCODER_PREFIXES)


def load_tae_decoder(sd: Mapping[str, Tensor], config: TAEConfig = TAEConfig(), *, device="cpu",
                     dtype: torch.dtype = torch.float32, source="TAE state dict") -> tuple[TAEDecoder, list[str]]:
    """The TAE decoder from a full (or decoder-only) state dict: (decoder in eval mode without
    grads, encoder keys skipped). Raises KeyMismatch listing every missing, unexpected or
    mis-shaped key."""
    return _decoder_from(sd, TAE_ENCODER_PREFIXES, lambda: TAEDecoder(config), source=source,
                         what=f"TAE decoder (channels {list(config.channels)})", device=device, dtype=dtype)


def load_tae(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, repo: str = TAE_REPO, filename: str = TAE_FILENAME,
             revision: str | None = None, local_dir: str | os.PathLike | None = None,
             config: TAEConfig | None = None) -> TAEDecoder:
    """Load the TAE decoder from `taew2_1.pth` (its 64 `decoder.*` tensors; encoder keys skipped).

    path: a local `.pth` / `.safetensors` file; None fetches `filename` from the hub `repo`
        (into `local_dir` when given; a file already there is used without the network).
        Offline (HF_HUB_OFFLINE=1) a missing file raises WeightsNotFound with the `hf download`
        command to run.
    config: default TAEConfig(), with denormalize=True when the file name starts with "lighttae".
    Returns the decoder on `device` in `dtype`, eval mode, requires_grad False. Raises
    WeightsCorrupt / UnsafeCheckpoint for unreadable files and KeyMismatch listing every missing,
    unexpected or mis-shaped key, all naming the file.
    """
    path = Path(path) if path is not None else fetch_tae(repo, filename, revision, local_dir)
    sd = tensors_only(read_checkpoint(path), path, "TAE file")
    if config is None:
        config = TAEConfig(denormalize=path.name.startswith("lighttae"))
    return load_tae_decoder(sd, config, device=device, dtype=dtype, source=path)[0]

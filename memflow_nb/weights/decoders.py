"""The decoders' weights: the Wan VAE's decoder half and the TAE, encoder keys skipped.

    vae = load_vae("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", device="cuda")
    tae = load_tae(None, device="cuda", dtype=torch.float16)   # fetches lightx2v/Autoencoders/taew2_1.pth
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..decode.encoder import ENCODER_PREFIXES
from ..decode.tae import TAEConfig, TAEDecoder
from ..decode.vae import VAEConfig, WanVAEDecoder
from .build import build_assigned, check_state_dict, meta_shapes, split_state_dict
from .download import TAE_FILENAME, TAE_REPO, fetch_tae
from .files import read_checkpoint, tensors_only

log = logging.getLogger(__name__)

__all__ = ["DecoderFile", "WAN_VAE_FILE", "TAE_FILE", "split_vae_state_dict", "load_vae_decoder", "load_vae",
           "split_tae_state_dict", "load_tae_decoder", "load_tae"]


@dataclass(frozen=True)
class DecoderFile:
    """How a decoder's weights file is laid out: the module it fills and the encoder's key prefixes."""

    build: Callable[[Any], torch.nn.Module]  # config -> module
    encoder_prefixes: tuple[str, ...]  # keys only the encoder uses, skipped
    describe: Callable[[Any], str]  # config -> the module's name in messages

    def split(self, sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """(everything but the encoder keys, sorted encoder keys dropped)."""
        return split_state_dict(sd, self.encoder_prefixes)

    def load(self, sd: Mapping[str, Tensor], config, *, device="cpu", dtype: torch.dtype = torch.float32,
             source="state dict") -> tuple[torch.nn.Module, list[str]]:
        """(decoder from a full or decoder-only state dict, eval mode without grads; encoder keys
        skipped). Raises KeyMismatch listing every missing, unexpected or mis-shaped key."""
        dec, skipped = self.split(sd)
        check_state_dict(meta_shapes(lambda: self.build(config)), dec, source=source, what=self.describe(config))
        return build_assigned(lambda: self.build(config), dec, device=device, dtype=dtype), skipped


WAN_VAE_FILE = DecoderFile(WanVAEDecoder, ENCODER_PREFIXES, lambda c: f"VAE decoder (dim {c.dim})")
TAE_FILE = DecoderFile(TAEDecoder, ("encoder.",), lambda c: f"TAE decoder (channels {list(c.channels)})")
split_vae_state_dict = WAN_VAE_FILE.split
split_tae_state_dict = TAE_FILE.split


def load_vae_decoder(sd: Mapping[str, Tensor], config: VAEConfig = VAEConfig(), **kw) -> tuple[WanVAEDecoder, list]:
    """`WAN_VAE_FILE.load`: (the VAE decoder, encoder keys skipped) from a state dict."""
    return WAN_VAE_FILE.load(sd, config, **kw)


def load_tae_decoder(sd: Mapping[str, Tensor], config: TAEConfig = TAEConfig(), **kw) -> tuple[TAEDecoder, list]:
    """`TAE_FILE.load`: (the TAE decoder, encoder keys skipped) from a state dict."""
    return TAE_FILE.load(sd, config, **kw)


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

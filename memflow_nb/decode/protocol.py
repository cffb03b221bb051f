"""The decoder protocol: latents in, pixels out, an immutable state carried between chunks.

    state = init_decode_state(decoder)
    pixels, state = decode_chunk(decoder, latents, state)   # [B, F, 16, h, w] -> [B, T, 3, H, W]
    frames = to_uint8(pixels[0])                            # uint8 [T, H, W, 3]

The Wan VAE (`decode.vae.WanVAEDecoder`) and the TAE (`decode.tae.TAEDecoder`) implement it.
Both are causal in time: a clip's first latent frame makes one pixel frame and every later one
`temporal stride` frames (4 for Wan 2.1), so chunks of 3 latent frames make 9 frames, then 12.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Decoder", "DecodeState", "CausalDecoder", "init_decode_state", "decode_chunk", "decode_video",
           "causal_pixel_frames", "check_latents", "moved", "tensor_bytes", "to_uint8"]


class DecodeState(Protocol):
    """Where a streaming decode stands; immutable (decoding returns a new one)."""

    latent_frames: int  # decoded so far; 0: the next chunk starts a clip
    latent_shape: tuple[int, int, int] | None  # (B, h, w), fixed by the first chunk

    def to(self, device) -> "DecodeState":
        """The same state with its tensors on `device`."""

    def tensors(self) -> list[Tensor]:
        """The tensors it holds (for byte counts)."""


class Decoder(Protocol):
    """A streaming latent-to-pixel decoder."""

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent, along height and width (8 for Wan 2.1)."""

    def init_state(self) -> DecodeState:
        """A fresh state: the next chunk starts a clip."""

    def decode(self, latents: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """latents [B, F, C, h, w] (normalised, as the generator makes them) -> (pixels
        [B, pixel_frames(F, first), 3, h * stride, w * stride] float32 about [-1, 1], new state)."""

    def pixel_frames(self, latent_frames: int, first: bool = True) -> int:
        """Pixel frames made by `latent_frames` latents (`first`: at the start of a clip)."""


def causal_pixel_frames(latent_frames: int, temporal_stride: int, first: bool = True) -> int:
    """stride * T pixel frames, less stride - 1 at the start of a clip: 1 + stride * (T - 1)."""
    n = temporal_stride * max(latent_frames, 0)
    return max(n - (temporal_stride - 1), 0) if first else n


class CausalDecoder(nn.Module):
    """Base of the decoders here: holds the config and answers what follows from it
    (spatial_stride, pixel_frames). Subclasses add `init_state` and `decode`; they hold no
    decode state themselves."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def spatial_stride(self) -> int:
        return self.config.spatial_stride

    def pixel_frames(self, latent_frames: int, first: bool = True) -> int:
        return self.config.pixel_frames(latent_frames, first)


def init_decode_state(decoder: Decoder) -> DecodeState:
    """A fresh state for `decoder`: the next `decode_chunk` starts a clip."""
    return decoder.init_state()


def decode_chunk(decoder: Decoder, latents: Tensor, state: DecodeState, **options) -> tuple[Tensor, DecodeState]:
    """Decode the next latent frames of a stream: latents [B, F, C, h, w] -> (pixels [B, T, 3, H, W],
    new state), T = decoder.pixel_frames(F, first=state.latent_frames == 0). `state` is not
    changed, so decoding again from it gives the same frames. options go to `decoder.decode`."""
    return decoder.decode(latents, state, **options)


def decode_video(decoder: Decoder, latents: Tensor, **options) -> Tensor:
    """Decode a whole clip: latents [B, F, C, h, w] -> pixels [B, 1 + 4(F - 1), 3, H, W] (Wan 2.1)."""
    return decode_chunk(decoder, latents, init_decode_state(decoder), **options)[0]


def check_latents(latents: Tensor, state: DecodeState, carried: int, *, what: str, channels: str,
                  expected_channels: int, slots: int) -> None:
    """ValueError unless latents are [B, T, expected_channels, h, w] with T >= 1, the state has the
    decoder's `slots` carried slots, and (B, h, w) is the stream's."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be [B, T, C, h, w] (5-D), got {shape}")
    b, t, c, h, w = latents.shape
    if c != expected_channels:
        raise ValueError(f"latents have {c} channels at dim 2, the {what} expects {channels}={expected_channels} "
                         f"(layout [B, T, C, h, w]; got shape {tuple(latents.shape)})")
    if t < 1:
        raise ValueError("latents have no frames (T = 0)")
    if carried != slots:
        raise ValueError(f"the state has {carried} slots, this {what} needs {slots}: it belongs to another decoder")
    if state.latent_shape is not None and state.latent_shape != (b, h, w):
        raise ValueError(f"latents (B, h, w) = {(b, h, w)} differ from the stream's {state.latent_shape}")


def moved(tensors: tuple[Tensor | None, ...], device) -> tuple[Tensor | None, ...]:
    """`tensors` on `device` (None stays None): for a decode state's `.to`."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the storages behind `tensors`, each storage counted once (views and shared
    tensors add nothing); None entries are skipped."""
    storages = {(t.untyped_storage().data_ptr(), t.device): t.untyped_storage().nbytes()
                for t in tensors if t is not None}
    return sum(storages.values())


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Decoder output [T, 3, H, W] or [B, T, 3, H, W] -> uint8 numpy [T, H, W, 3] / [B, T, H, W, 3].

    Clamps to [-1, 1] and maps (x + 1) / 2 * 255, rounded to nearest (ties to even). The official
    scripts truncate instead (`.to(torch.uint8)`), so they can be one level lower.
    """
    if pixels.dim() not in (4, 5) or pixels.shape[-3] != 3:
        raise ValueError(f"pixels must be [T, 3, H, W] or [B, T, 3, H, W], got {tuple(pixels.shape)}")
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()

"""The Wan2.1 causal 3-D VAE encoder (pixels -> normalised latents), streaming exactly.

It is the other half of `Wan2.1_VAE.pth` (`encoder.*` and `conv1`, 86 tensors); parameter names
match the file. It turns pictures from outside a stream into latents that the DiT can hold as
memory frames (`memflow_nb.interventions.inject_image`).

Time is causal as in the decoder: every causal conv sees the frames before it (zeros before the
clip starts) and keeps its last 2 input frames between calls. The two temporal downsamples are
stride-2 time convs: the clip's first frame passes them unchanged (the official cache holds it
and skips the conv), then each pair of frames is convolved with the frame before it. So pixel
frame 0 makes latent frame 0 and each next 4 pixel frames make one latent frame, and a clip
encoded in chunks (1 + 4k frames first, then multiples of 4) gives exactly the latents of
encoding it whole, as the official code does in chunks of 1, 4, 4, ...

Layouts: pixels [B, T, 3, H, W] in [-1, 1] and latents [B, F, z_dim, H/8, W/8] (as the generator
makes them); inside, [B, C, T, H, W] like the official code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import AttentionBlock, CausalConv3d, ResidualBlock, RMSNorm, VAEConfig, _norm_silu, _Pass

# The keys of `Wan2.1_VAE.pth` only the encoder uses (the decoder's loader skips them).
ENCODER_PREFIXES = ("encoder.", "conv1.")


class Downsample(nn.Module):
    """Zero-pad right/bottom by 1 and a 3x3 stride-2 conv on every frame; optionally halves time after.

    Temporal mode: `time_conv` (kernel 3, stride 2 in time) runs over [previous frame | this call's
    frames]; at the start of a clip the first frame is passed through unchanged instead.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # index 0 is the official nn.ZeroPad2d (no parameters); the padding is done in forward
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.slot = -1  # state slot of the previous frame (temporal mode), set by WanVAEEncoder

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        conv = self.resample[1]
        x = F.conv3d(F.pad(x, (0, 1, 0, 1)), conv.weight.unsqueeze(2), conv.bias, stride=(1, 2, 2))
        if self.time_conv is None:
            return x
        prev = ps.old[self.slot]
        ps.new[self.slot] = x[:, :, -1:].clone()
        if prev is None:  # start of the clip: frame 0 stays, then pairs with the frame before them
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2) if x.shape[2] > 1 else x
        return self.time_conv(torch.cat([prev, x], dim=2))


class Encoder3d(nn.Module):
    """conv 3->dim, residual stages with downsamples, middle (res, attn, res), norm-SiLU-conv to 2*z_dim."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1,) + cfg.dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(out_dim, cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                    ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 2 * cfg.z_dim, 3))

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        x = self.conv1(x, ps)
        for layer in self.downsamples:
            x = layer(x, ps)
        for layer in self.middle:
            x = layer(x, ps)
        return self.head[2](_norm_silu(x, self.head[0].gamma, self.head[0].scale), ps)


class WanVAEEncoder(nn.Module):
    """The encoding half of the Wan2.1 VAE: `encoder` and `conv1` (1x1x1 on its 2*z_dim output).

    Build on the meta device and load by name, or use `load_vae_encoder`. Holds no state; see
    `encode_chunk`.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        stateful = [m for m in self.encoder.modules() if (isinstance(m, CausalConv3d) and m.past > 0)
                    or (isinstance(m, Downsample) and m.time_conv is not None)]
        for slot, m in enumerate(stateful):
            m.slot = slot
        self.num_cache_slots = len(stateful)


@dataclass(frozen=True, eq=False)
class VAEEncodeState:
    """Where a streaming encode stands. Immutable: `encode_chunk` returns a new one.

    caches: per causal conv its last 2 input frames, per temporal downsample its last input frame
        (None before the first chunk). pixel_frames: frames encoded so far. pixel_shape: (B, H, W).
    """

    caches: tuple[Optional[torch.Tensor], ...]
    pixel_frames: int = 0
    pixel_shape: Optional[tuple[int, int, int]] = None

    def to(self, device) -> "VAEEncodeState":
        return VAEEncodeState(tuple(c if c is None else c.to(device) for c in self.caches), self.pixel_frames,
                              self.pixel_shape)

    def tensors(self) -> list[torch.Tensor]:
        return [c for c in self.caches if c is not None]


def init_encode_state(encoder: WanVAEEncoder) -> VAEEncodeState:
    """A fresh state: the next `encode_chunk` starts a clip."""
    return VAEEncodeState(caches=(None,) * encoder.num_cache_slots)


def latent_frames(pixel_frames: int, first: bool, temporal_stride: int = 4) -> int:
    """Latent frames made by `pixel_frames` pixel frames (the clip's first chunk if `first`)."""
    return (pixel_frames - 1) // temporal_stride + 1 if first else pixel_frames // temporal_stride


def _check_pixels(encoder: WanVAEEncoder, pixels, state: VAEEncodeState) -> None:
    cfg = encoder.config
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be [B, T, 3, H, W] (5-D), got {shape}")
    b, t, c, h, w = pixels.shape
    if c != 3:
        raise ValueError(f"pixels have {c} channels at dim 2; the VAE encodes RGB (layout [B, T, 3, H, W], "
                         f"got {tuple(pixels.shape)})")
    s, ts = cfg.spatial_stride, cfg.temporal_stride
    if h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"pixel size {h}x{w} must be a positive multiple of {s} (the VAE's spatial stride)")
    first = state.pixel_frames == 0
    if (first and (t - 1) % ts) or (not first and (t == 0 or t % ts)):
        want = f"1 + {ts}k frames (1, {1 + ts}, ...)" if first else f"a positive multiple of {ts} frames"
        raise ValueError(f"pixels have {t} frames; the {'first' if first else 'next'} chunk of a clip needs {want}, "
                         f"so that every {ts} pixel frames make one latent frame")
    if len(state.caches) != encoder.num_cache_slots:
        raise ValueError(f"state has {len(state.caches)} cache slots, this encoder needs {encoder.num_cache_slots}")
    if state.pixel_shape is not None and state.pixel_shape != (b, h, w):
        raise ValueError(f"pixels (B, H, W) = {(b, h, w)} differ from the clip's {state.pixel_shape}")


@torch.no_grad()
def encode_chunk(encoder: WanVAEEncoder, pixels: torch.Tensor, state: VAEEncodeState
                 ) -> tuple[torch.Tensor, VAEEncodeState]:
    """Encode the next pixel frames of a clip.

    pixels: [B, T, 3, H, W] in [-1, 1]; T = 1 + 4k for the clip's first chunk, 4k afterwards.
    Returns (normalised latents [B, F, z_dim, H/8, W/8] float32 (the mean, (mu - mean) / std, as
    the official encode), new state); F = 1 + k first, k afterwards. `state` is not changed.
    """
    _check_pixels(encoder, pixels, state)
    cfg = encoder.config
    p = next(encoder.parameters())
    x = pixels.to(device=p.device, dtype=p.dtype).permute(0, 2, 1, 3, 4).contiguous()  # [B, 3, T, H, W]
    ps = _Pass(state.caches, state.pixel_frames == 0, torch.contiguous_format)
    out = encoder.conv1(encoder.encoder(x, ps))
    mu = out[:, :cfg.z_dim].float()
    mean = torch.tensor(cfg.latent_mean, device=mu.device).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latent_std, device=mu.device).view(1, -1, 1, 1, 1)
    latents = ((mu - mean) * inv_std).permute(0, 2, 1, 3, 4).contiguous()
    b, t, _, h, w = pixels.shape
    return latents, VAEEncodeState(tuple(ps.new), state.pixel_frames + t, (b, h, w))


def encode_video(encoder: WanVAEEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """Encode a whole clip: pixels [B, 1 + 4k, 3, H, W] in [-1, 1] -> latents [B, 1 + k, z_dim, H/8, W/8]."""
    return encode_chunk(encoder, pixels, init_encode_state(encoder))[0]


def encoder_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors (`encoder.*`, `conv1.*`) of a full VAE state dict."""
    return {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}


def load_vae_encoder(source, *, config: Optional[VAEConfig] = None, device=None, dtype=None,
                     local_dir: str | os.PathLike | None = None, seed: int = 0) -> WanVAEEncoder:
    """The Wan2.1 VAE encoder, in eval mode without grads.

    source: the path of `Wan2.1_VAE.pth` (its 86 encoder tensors are read), a VAE state dict, or a
        pipeline (`memflow_nb.load(...)`): for MemFlow its `Wan2.1_VAE.pth` (found like `load` finds
        it; `local_dir` as there), for "tiny" random recipe weights (`seed`) at the tiny Wan VAE's
        width (`memflow_nb.pipeline.TINY_VAE`; the tiny pipeline itself decodes with a TAE).
    config: defaults to VAEConfig() with `dim` read off `encoder.conv1.weight`.
    device / dtype: default to the pipeline's, else the CPU in float32.
    Raises (naming the file) on missing, unexpected or mis-shaped encoder keys.
    """
    from ..weights import build_assigned, check_state_dict, fetch_weights, meta_shapes, random_module, read_checkpoint
    from ..weights.files import tensors_only

    if hasattr(source, "vae") and hasattr(source, "model"):  # a Pipeline
        device = source.device if device is None else device
        dtype = source.dtype if dtype is None else dtype
        if getattr(source, "random_weights", False):
            from ..pipeline import TINY_VAE

            cfg = config or TINY_VAE
            return random_module(lambda: WanVAEEncoder(cfg), seed, device=device, dtype=dtype)
        source = fetch_weights(local_dir).vae
    device = "cpu" if device is None else device
    dtype = torch.float32 if dtype is None else dtype
    name = "state dict" if isinstance(source, Mapping) else str(source)
    sd = source if isinstance(source, Mapping) else tensors_only(read_checkpoint(source), source, "VAE file")
    enc = encoder_state_dict(sd)
    if config is None:
        conv = enc.get("encoder.conv1.weight")
        config = VAEConfig(dim=conv.shape[0]) if conv is not None else VAEConfig()
    check_state_dict(meta_shapes(lambda: WanVAEEncoder(config)), enc, source=name,
                     what=f"VAE encoder (dim {config.dim}; a decoder-only file has none: use the full Wan2.1_VAE.pth)")
    return build_assigned(lambda: WanVAEEncoder(config), enc, device=device, dtype=dtype)

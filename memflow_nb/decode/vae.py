"""The Wan2.1 causal 3-D VAE decoder with exact streaming decode.

Only what decoding needs is built (`conv2` and `decoder.*`); parameter names match the official
`Wan2.1_VAE.pth`, so its state dict loads by name once the encoder keys are split off.

Time is causal everywhere: every causal conv sees the frames before it (zeros before the
start of the clip), and every other layer works on one frame at a time. So a clip decoded in
chunks gives exactly the frames of decoding it whole, provided each causal conv keeps the last
2 frames of its input between calls. That state lives in `VAEDecodeState`, never in the module.

The one special case is the temporal upsample: latent frame 0 makes a single pixel frame. Its
time conv skips frame 0 (the official code marks its cache "Rep"), so the time conv only ever
sees frames 1, 2, ... with zeros in front, and each of those frames becomes two.

Layouts: `decode` takes latents [B, T, C, h, w] (normalised, as the generator makes them) and
returns pixels [B, T_pix, 3, H, W]; inside, tensors are [B, C, T, H, W] like the official code,
because Conv3d wants channels before time. Loading: `memflow_nb.weights.load_vae`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .protocol import CausalDecoder, causal_pixel_frames, check_latents, moved

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the Wan2.1 VAE (defaults = `Wan2.1_VAE.pth`) and its latent normalisation."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latent_mean", tuple(float(v) for v in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(v) for v in self.latent_std))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig: temporal_downsample needs {len(self.dim_mult) - 1} entries "
                             f"(one per resample), got {len(self.temporal_downsample)}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"VAEConfig: latent_mean/std need z_dim={self.z_dim} values, "
                             f"got {len(self.latent_mean)}/{len(self.latent_std)}")
        if any(s <= 0 for s in self.latent_std):
            raise ValueError("VAEConfig: latent_std must be positive")
        if any((self.dim * m) % 2 for m in self.dim_mult):
            raise ValueError("VAEConfig: every stage width dim*dim_mult must be even (upsamples halve it)")

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Decoder stages that double time (the encoder's downsampling reversed)."""
        return self.temporal_downsample[::-1]

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def pixel_frames(self, latent_frames: int, first: bool = True) -> int:
        """Pixel frames made by `latent_frames` latents: 1 + stride * (T - 1) for a clip's first
        chunk, stride * T later."""
        return causal_pixel_frames(latent_frames, self.temporal_stride, first)


# ------------------------------------------------------------------------------------- layers

class _Pass:
    """Per-call bookkeeping: caches read (never written), caches made, and whether latent frame 0
    is the first frame of this call."""

    def __init__(self, old: Sequence[torch.Tensor | None], first: bool, memory_format):
        self.old = old
        self.new: list[torch.Tensor | None] = list(old)
        self.first = first
        self.memory_format = memory_format


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 'same' in space and causally in time (kt - 1 frames of past, none of future).

    The past comes from the cache slot `self.slot` of the current pass (zeros at the start of a
    clip); the last kt - 1 input frames become the next cache. 1-frame kernels need no cache.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int]):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        super().__init__(in_dim, out_dim, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.past = kernel[0] - 1
        self.slot = -1  # set by WanVAEDecoder once all convs exist

    def forward(self, x: torch.Tensor, ps: _Pass | None = None) -> torch.Tensor:
        if self.past == 0:
            return super().forward(x)
        prev = ps.old[self.slot]
        if prev is None:  # start of the clip: the official zero padding
            b, c, _, h, w = x.shape
            prev = x.new_zeros(b, c, self.past, h, w).contiguous(memory_format=ps.memory_format)
        xx = torch.cat([prev, x], dim=2)
        # clone so the cache does not keep the whole chunk's activation alive
        ps.new[self.slot] = xx[:, :, -self.past:].clone()
        return super().forward(xx)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (Wan's RMS_norm; no bias)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gamma is (C,1,1) in the attention block but always applied to [B, C, T, H, W] here
        gamma = self.gamma.view(-1, *(1,) * (x.dim() - 2))
        return F.normalize(x, dim=1) * self.scale * gamma


def _norm_silu(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    # RMSNorm then SiLU in one function: a compiled decoder (memflow_nb.fast) fuses the passes.
    return F.silu(F.normalize(x, dim=1) * scale * gamma.view(-1, *(1,) * (x.dim() - 2)))


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3 twice plus a (1x1x1 conv when widths differ) shortcut.

    `residual` indices follow the official Sequential (norm, silu, conv, norm, silu, dropout, conv)
    so parameter names are residual.0/2/3/6.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        r = self.residual
        h = x if self.shortcut is None else self.shortcut(x, ps)
        y = r[2](_norm_silu(x, r[0].gamma, r[0].scale), ps)
        y = r[6](_norm_silu(y, r[3].gamma, r[3].scale), ps)
        return y + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        b, c, _, h, _ = x.shape
        tokens = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        # the 1x1 convs are linear maps over channels; q, k, v are consecutive channel blocks
        q, k, v = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        o = F.linear(o, self.proj.weight.view(c, c), self.proj.bias)
        o = rearrange(o, "(b t) (h w) c -> b c t h w", b=b, h=h)
        return x + o.contiguous(memory_format=ps.memory_format)


class Upsample(nn.Module):
    """Nearest x2 in space + 3x3 conv halving the channels; optionally doubles time first.

    Temporal mode: `time_conv` maps each frame (except latent frame 0) to 2*dim channels, read as
    two consecutive frames of dim channels. Latent frame 0 bypasses it and stays one frame.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # index 0 is the official nn.Upsample (no parameters); the upsampling is done in forward
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        if self.time_conv is not None:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if ps.first else (None, x)
            if rest.shape[2] > 0:
                y = self.time_conv(rest, ps)  # [B, 2C, n, H, W]
                # channels [:C] are frame 2i, [C:] frame 2i+1
                y = rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)
                y = y.contiguous(memory_format=ps.memory_format)
                x = y if head is None else torch.cat([head, y], dim=2)
            else:  # a chunk of just latent frame 0: nothing for the time conv yet
                x = head
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        conv = self.resample[1]
        # the 2-D conv applied to every frame, as a (1,3,3) 3-D conv to avoid reshapes
        return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))


class Decoder3d(nn.Module):
    """conv 16->4*dim, middle (res, attn, res), upsample stages, norm-SiLU-conv head to RGB."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks = []
        n_stages = len(cfg.dim_mult)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous stage's upsample halved the width
                in_dim //= 2
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < n_stages - 1:
                blocks.append(Upsample(out_dim, cfg.temporal_upsample[i]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor, ps: _Pass) -> torch.Tensor:
        x = self.conv1(x, ps)
        for layer in self.middle:
            x = layer(x, ps)
        for layer in self.upsamples:
            x = layer(x, ps)
        return self.head[2](_norm_silu(x, self.head[0].gamma, self.head[0].scale), ps)


class WanVAEDecoder(CausalDecoder):
    """The decoding half of the Wan2.1 VAE (`conv2`, a 1x1x1 conv on latents, and `decoder`), a
    `memflow_nb.decode.Decoder`; `memflow_nb.weights.load_vae` loads it."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__(config)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        cached = [m for m in self.decoder.modules() if isinstance(m, CausalConv3d) and m.past > 0]
        for slot, m in enumerate(cached):
            m.slot = slot
        self.num_cache_slots = len(cached)

    def init_state(self) -> "VAEDecodeState":
        """A fresh state: the next `decode` starts a clip."""
        return VAEDecodeState(caches=(None,) * self.num_cache_slots)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: "VAEDecodeState", *, per_frame: bool = False,
               memory_format: torch.memory_format = torch.contiguous_format,
               ) -> tuple[torch.Tensor, "VAEDecodeState"]:
        """Decode the next latent frames of a stream.

        latents: [B, T, z_dim, h, w], normalised (mapped here with z * std + mean).
        Returns (pixels [B, T_pix, 3, h * stride, w * stride] float32, raw decoder output, not
        clamped; new state), T_pix = `self.pixel_frames(T, first)`. `state` is not changed, so
        decoding again from it gives the same frames.

        per_frame=False (default) pushes the whole chunk through each layer at once; per_frame=True
        runs one latent frame at a time like the official decoder (reference path; same numbers).
        memory_format=torch.channels_last_3d keeps activations channels-last (faster convs on GPU).
        """
        cfg = self.config
        check_latents(latents, state, len(state.caches), what="VAE", channels="z_dim",
                      expected_channels=cfg.z_dim, slots=self.num_cache_slots)
        p = next(self.parameters())
        z = rearrange(latents.to(device=p.device, dtype=torch.float32), "b t c h w -> b c t h w")
        mean = torch.tensor(cfg.latent_mean, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latent_std, device=z.device).view(1, -1, 1, 1, 1)
        x = (z * std + mean).to(p.dtype).contiguous(memory_format=memory_format)
        x = self.conv2(x)  # 1x1x1, per frame

        caches, first = state.caches, not state.first_done
        steps = [x] if not per_frame else list(x.split(1, dim=2))
        outs = []
        for step in steps:
            ps = _Pass(caches, first, memory_format)
            outs.append(self.decoder(step, ps))
            caches, first = tuple(ps.new), False
        pixels = rearrange(torch.cat(outs, dim=2), "b c t h w -> b t c h w").float().contiguous()
        b, t, _, h, w = latents.shape
        return pixels, VAEDecodeState(caches, state.latent_frames + t, (b, h, w))


@dataclass(frozen=True, eq=False)
class VAEDecodeState:
    """Where a streaming decode stands. Immutable: `WanVAEDecoder.decode` returns a new one.

    caches: per causal conv (kernel longer than 1 frame), the last kt-1 = 2 input frames
        [B, C, 2, H', W'], or None before the first chunk (the clip starts with zeros).
    latent_frames: latent frames decoded so far; 0 means the next chunk starts the clip.
    latent_shape: (B, h, w) fixed by the first chunk.
    """

    caches: tuple[torch.Tensor | None, ...]
    latent_frames: int = 0
    latent_shape: tuple[int, int, int] | None = None

    @property
    def first_done(self) -> bool:
        return self.latent_frames > 0

    def to(self, device) -> "VAEDecodeState":
        """The same state with its tensors on `device` (for checkpoints kept off the GPU)."""
        return replace(self, caches=moved(self.caches, device))

    def tensors(self) -> list[torch.Tensor]:
        return [c for c in self.caches if c is not None]

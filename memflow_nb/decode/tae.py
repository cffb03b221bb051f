"""The tiny autoencoder decoder ("TAE", `taew2_1.pth`) for Wan 2.1 latents: a cheap preview decoder.

    tae = load_tae(None, device="cuda", dtype=torch.float16)    # memflow_nb.weights: fetches taew2_1.pth
    state = init_decode_state(tae)
    pixels, state = decode_chunk(tae, latents, state)           # [B, 3, 16, h, w] -> [B, 9, 3, 8h, 8w]
    frames = to_uint8(pixels[0])                                # memflow_nb.decode

About 25x fewer FLOPs than the Wan VAE decoder, at some cost in quality. The network works on
one frame at a time with 2-D convs; time enters only through
  - MemBlocks: out = relu(convs(cat[x_t, x_{t-1}]) + x_t), where x_{t-1} is the block's own input
    one frame earlier (zeros before the first frame), and
  - TGrow: a 1x1 conv to `stride` times the channels, read as `stride` consecutive frames.
So the decoder is causal, and streaming needs only the previous input frame of each MemBlock,
kept in `TAEDecodeState`. Decoder layout (the `decoder.{i}` indices of the checkpoint):

    0 clamp tanh(x/3)*3   1 conv3 16->256 + ReLU(2)
    3-5 MemBlock(256)  6 upsample x2  7 TGrow x1  8 conv3 256->128 (no bias)
    9-11 MemBlock(128) 12 upsample x2 13 TGrow x2 14 conv3 128->64 (no bias)
    15-17 MemBlock(64) 18 upsample x2 19 TGrow x2 20 conv3 64->64 (no bias)
    21 ReLU  22 conv3 64->3

Each latent frame makes 4 raw frames; the first 3 raw frames of a clip are dropped (once), so a
clip of T latents gives 4T - 3 frames like the Wan VAE's 1 + 4(T - 1): chunk 0 of 3 latents
gives 9 frames, each later chunk 12. The raw output is an image in [0, 1]; we clamp it and map it
to [-1, 1] so it matches the Wan VAE output (and `memflow_nb.decode.to_uint8`).

Latent convention: `taew2_1.pth` decodes the latents exactly as the diffusion model makes them,
i.e. our normalised latents ((z - mean) / std), with no shift or scale. The `lighttaew2_1.pth`
variant expects raw Wan VAE latents, so with `TAEConfig(denormalize=True)` the decoder maps
z * std + mean first (`load_tae` sets this when the file name starts with "lighttae").
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .protocol import CausalDecoder, causal_pixel_frames, check_latents, moved
from .vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD

__all__ = ["TAEConfig", "TAEDecoder", "TAEDecodeState"]


@dataclass(frozen=True)
class TAEConfig:
    """Architecture of the TAE decoder (defaults = `taew2_1.pth`) and its latent convention.

    channels: width of each stage and of the final conv's input (stage i runs at channels[i]).
    blocks_per_stage: MemBlocks per stage.
    time_upscale / space_upscale: per stage, whether its TGrow doubles time / its upsample
        doubles height and width. The weights fix time_upscale (TGrow's width depends on it).
    denormalize: map latents z -> z * latent_std + latent_mean before decoding (`lighttaew2_1`);
        False for `taew2_1`, which decodes our normalised latents as they are.
    """

    latent_channels: int = 16
    image_channels: int = 3
    channels: tuple[int, ...] = (256, 128, 64, 64)
    blocks_per_stage: int = 3
    time_upscale: tuple[bool, ...] = (False, True, True)
    space_upscale: tuple[bool, ...] = (True, True, True)
    denormalize: bool = False
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self):
        for name, kind in (("channels", int), ("time_upscale", bool), ("space_upscale", bool),
                           ("latent_mean", float), ("latent_std", float)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        stages = len(self.channels) - 1
        if stages < 1 or len(self.time_upscale) != stages or len(self.space_upscale) != stages:
            raise ValueError(f"TAEConfig: {len(self.channels)} channel entries make {stages} stages, so "
                             f"time_upscale/space_upscale need {stages} entries each, got "
                             f"{len(self.time_upscale)}/{len(self.space_upscale)}")
        if len(self.latent_mean) != self.latent_channels or len(self.latent_std) != self.latent_channels:
            raise ValueError(f"TAEConfig: latent_mean/std need {self.latent_channels} values")
        if any(s <= 0 for s in self.latent_std):
            raise ValueError("TAEConfig: latent_std must be positive")

    @property
    def time_stride(self) -> int:
        """Raw pixel frames per latent frame (4 for Wan 2.1)."""
        return 2 ** sum(self.time_upscale)

    @property
    def spatial_stride(self) -> int:
        return 2 ** sum(self.space_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Raw frames dropped once at the start of a clip, so T latents give 1 + stride * (T - 1)."""
        return self.time_stride - 1

    def pixel_frames(self, latent_frames: int, first: bool = True) -> int:
        """Frames made by `latent_frames` latents: 4T - 3 for a clip's first chunk, 4T later."""
        return causal_pixel_frames(latent_frames, self.time_stride, first)


# ------------------------------------------------------------------------------------- layers

def _conv3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): tanh(x / 3) * 3 (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv-relu-conv-relu-conv(cat[x, past]) + skip(x)) on frames [N, C, H, W].

    `past` is this block's input one frame earlier. Parameter names follow the checkpoint:
    conv.0/2/4 (indices 1 and 3 are the ReLUs), skip (1x1, no bias) only when widths differ.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3(2 * n_in, n_out), nn.ReLU(), _conv3(n_out, n_out), nn.ReLU(),
                                  _conv3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """1x1 conv (no bias) C -> stride*C; channel group j of input frame t becomes frame t*stride + j.

    [B*T, C, H, W] (time-major within each batch row) -> [B*T*stride, C, H, W].
    """

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.conv(x), "n (s c) h w -> (n s) c h w", s=self.stride)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling of [N, C, H, W] by `scale` (no parameters)."""

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale == 1 else F.interpolate(x, scale_factor=self.scale, mode="nearest")


class TAEDecoder(CausalDecoder):
    """TAEHV's decoding half for Wan 2.1 (`decoder.*` of `taew2_1.pth`), a `memflow_nb.decode.Decoder`;
    `memflow_nb.weights.load_tae` loads it."""

    def __init__(self, config: TAEConfig = TAEConfig()):
        super().__init__(config)
        c = config.channels
        layers: list[nn.Module] = [Clamp(), _conv3(config.latent_channels, c[0]), nn.ReLU()]
        for i in range(len(c) - 1):
            layers += [MemBlock(c[i], c[i]) for _ in range(config.blocks_per_stage)]
            layers += [Upsample(2 if config.space_upscale[i] else 1), TGrow(c[i], 2 if config.time_upscale[i] else 1),
                       _conv3(c[i], c[i + 1], bias=False)]
        layers += [nn.ReLU(), _conv3(c[-1], config.image_channels)]
        self.decoder = nn.Sequential(*layers)
        # the layers whose previous input frame is carried between chunks
        self.mem_indices = tuple(i for i, m in enumerate(self.decoder) if isinstance(m, MemBlock))

    def init_state(self) -> "TAEDecodeState":
        """A fresh state: the next `decode` starts a clip."""
        return TAEDecodeState(memory=(None,) * len(self.mem_indices))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, state: "TAEDecodeState", *, per_frame: bool = False
               ) -> tuple[torch.Tensor, "TAEDecodeState"]:
        """Decode the next latent frames of a stream with the TAE.

        latents: [B, T, 16, h, w], our normalised latents (de-normalised here if config.denormalize).
        Returns (pixels [B, T_pix, 3, 8h, 8w] float32 in [-1, 1], new state), T_pix =
        `self.pixel_frames(T, first)`: 4T - 3 for the clip's first chunk and 4T afterwards. `state`
        is not changed, so decoding again from it gives the same frames. Chunks of any size give
        the frames of decoding the clip whole.
        """
        if per_frame and latents.shape[1] > 1:  # one latent frame at a time: the same pixels, less memory
            pieces = []
            for f in range(latents.shape[1]):
                pixels, state = self.decode(latents[:, f:f + 1], state)
                pieces.append(pixels)
            return torch.cat(pieces, dim=1), state
        cfg = self.config
        check_latents(latents, state, len(state.memory), what="TAE", channels="latent_channels",
                      expected_channels=cfg.latent_channels, slots=len(self.mem_indices))
        p = next(self.parameters())
        b, t, _, h, w = latents.shape
        z = latents.to(device=p.device, dtype=torch.float32)
        if cfg.denormalize:
            mean = torch.tensor(cfg.latent_mean, device=z.device).view(1, 1, -1, 1, 1)
            std = torch.tensor(cfg.latent_std, device=z.device).view(1, 1, -1, 1, 1)
            z = z * std + mean
        # every layer works on frames: [B*T, C, h, w], time-major within each batch row
        x = z.to(p.dtype).reshape(b * t, -1, h, w)
        memory, slot = list(state.memory), 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                n, c, hh, ww = x.shape
                frames = x.view(b, n // b, c, hh, ww)
                prev = memory[slot]
                if prev is None:  # start of the clip: empty memory is a zero frame
                    prev = x.new_zeros(b, 1, c, hh, ww)
                else:
                    prev = prev.unsqueeze(1)
                # each frame's past is the frame before it; the chunk's first frame takes the carried one
                past = torch.cat([prev, frames[:, :-1]], dim=1).reshape(n, c, hh, ww)
                # clone so the state does not keep the whole chunk's activation alive
                memory[slot] = frames[:, -1].clone()
                slot += 1
                x = layer(x, past)
            else:
                x = layer(x)
        n, c, hh, ww = x.shape
        pixels = x.view(b, n // b, c, hh, ww)
        if state.latent_frames == 0:
            pixels = pixels[:, cfg.frames_to_trim:]
        # raw output is an image in [0, 1]; map to the Wan VAE's [-1, 1]
        pixels = pixels.float().clamp(0, 1) * 2 - 1
        return pixels.contiguous(), TAEDecodeState(tuple(memory), state.latent_frames + t, (b, h, w))


# ----------------------------------------------------------------------------------- streaming

@dataclass(frozen=True, eq=False)
class TAEDecodeState:
    """Where a streaming TAE decode stands. Immutable: `TAEDecoder.decode` returns a new one.

    memory: per MemBlock (in `tae.mem_indices` order), its last input frame [B, C, H', W'], or
        None before the first chunk (the clip starts with zeros).
    latent_frames: latent frames decoded so far; 0 means the next chunk starts the clip (and
        drops the first `frames_to_trim` raw frames).
    latent_shape: (B, h, w) fixed by the first chunk.
    """

    memory: tuple[torch.Tensor | None, ...]
    latent_frames: int = 0
    latent_shape: tuple[int, int, int] | None = None

    def to(self, device) -> "TAEDecodeState":
        return replace(self, memory=moved(self.memory, device))

    def tensors(self) -> list[torch.Tensor]:
        return [m for m in self.memory if m is not None]

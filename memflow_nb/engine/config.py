"""Frozen configs: the DiT architecture and the streaming settings.

Every size the engine uses (tokens per frame, heads, head dim, layers) is derived from these
two dataclasses and the latent resolution; nothing else is hard-coded.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the causal Wan2.1 DiT (parameter names follow Wan2.1)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_positions: int = 1024  # rows of the RoPE table (Wan2.1 trains with 1024)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"ModelConfig head dim {self.dim // self.num_heads} must be even (RoPE pairs)")
        if self.patch_size[0] != 1:
            raise ValueError("ModelConfig.patch_size[0] must be 1: the causal cache works per latent frame")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A named preset: 'wan2.1-t2v-1.3b' (MemFlow's backbone) or 'tiny' (random-weight CPU model)."""
        return preset(MODEL_PRESETS, name, "model")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Wan-style config dict (extra keys such as model_type are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(kw["patch_size"])
        return cls(**kw)


MODEL_PRESETS = MappingProxyType({
    "wan2.1-t2v-1.3b": ModelConfig(),
    # A model small enough to stream on a laptop CPU in seconds; its output is noise, not pictures.
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
})


EMPTY_FRAMES = ("zeros", "skip")


@dataclass(frozen=True)
class StreamConfig:
    """Streaming settings. Defaults equal the official MemFlow interactive inference config."""

    chunk_frames: int = 3  # latent frames per step (num_frame_per_block); the official bank math assumes 3
    local_attn_size: int = 12  # attention window in latent frames, sink and current chunk included
    sink_size: int = 3  # first latent frames kept for the whole stream
    bank_size: int = 3  # memory-bank slots (latent frames) per layer; 0 disables memory
    record_interval: int = 3  # record a bank prototype every this many chunks
    global_sink: bool = True  # keep the sink across prompt switches
    context_noise: float = 0.0  # timestep of the clean pass that writes the cache
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    timestep_shift: float = 5.0
    warp_denoising_steps: bool = True  # map the step list through the shifted table (official)
    sma: bool = False  # sparse memory activation
    sma_top_k: int = 3  # frames of [sink | bank] kept per head when SMA is on
    num_train_timesteps: int = 1000
    # Which official pipeline the bank follows. False: interactive_inference.py (a record is made
    # every record_interval chunks). True: the single-prompt inference.py, whose every clean pass
    # replaces the pending record with its chunk's first frame (the bank pointer still moves every
    # record_interval chunks, so the newest slot follows the latest chunk until the next record).
    bank_record_every_chunk: bool = False
    # Key frames the official code attends to before anything was written there (sink frames a
    # stream has not reached, bank slots not filled yet, slots emptied by `evict`): "zeros" attends
    # to all-zero keys/values there (official); "skip" leaves them out of attention.
    empty_frames: str = "zeros"

    def __post_init__(self):
        object.__setattr__(self, "denoising_steps", tuple(int(s) for s in self.denoising_steps))
        def need(cond, msg):
            if not cond:
                raise ValueError(f"StreamConfig: {msg}")
        need(self.chunk_frames >= 1, f"chunk_frames={self.chunk_frames} must be >= 1")
        need(self.sink_size >= 0, f"sink_size={self.sink_size} must be >= 0")
        need(self.bank_size >= 0, f"bank_size={self.bank_size} must be >= 0")
        need(self.record_interval >= 1, f"record_interval={self.record_interval} must be >= 1")
        need(self.local_attn_size != -1,
             "local_attn_size=-1 is the official 'global attention': the cache keeps the whole video, but "
             "attention still stops at 32760 tokens, sink included, which is 21 latent frames at 832x480 (at "
             "other sizes a different number of frames). It is local_attn_size=21 at 832x480; set that (we "
             "keep the window in frames at every size and never grow the cache with the video)")
        need(self.local_attn_size - self.sink_size >= self.chunk_frames,
             f"local_attn_size={self.local_attn_size} must leave room for sink_size={self.sink_size} "
             f"plus one chunk of {self.chunk_frames} frames")
        need(len(self.denoising_steps) >= 1, "denoising_steps is empty")
        need(all(0 < s <= self.num_train_timesteps for s in self.denoising_steps),
             f"denoising_steps={self.denoising_steps} must lie in (0, {self.num_train_timesteps}]")
        need(self.sma_top_k >= 1, f"sma_top_k={self.sma_top_k} must be >= 1")
        need(self.timestep_shift > 0, f"timestep_shift={self.timestep_shift} must be > 0")
        need(self.empty_frames in EMPTY_FRAMES, f"empty_frames={self.empty_frames!r} must be one of {EMPTY_FRAMES}")

    @property
    def prev_frames(self) -> int:
        """Non-sink cached frames a chunk attends to besides itself."""
        return self.local_attn_size - self.sink_size - self.chunk_frames

    def replace(self, **changes) -> "StreamConfig":
        return dataclasses.replace(self, **changes)


def warn_unofficial(stream: StreamConfig) -> None:
    """Warn (once per setting, through `warnings`) where the official code computes something else.

    The official bank arithmetic has literal 3s for the chunk length (the bank pointer, which
    record slots a pass sees, the record test), so with chunk_frames != 3 it attends to a fraction
    of a frame of zero keys; ours counts in chunks of chunk_frames.
    """
    if stream.chunk_frames != 3:
        warnings.warn(f"StreamConfig(chunk_frames={stream.chunk_frames}): the official MemFlow bank arithmetic "
                      "assumes 3-frame chunks (literal 3s), so it computes something else here; memflow_nb "
                      "generalises it (a record every record_interval chunks of chunk_frames frames)",
                      UserWarning, stacklevel=3)


def preset(presets: Mapping, name: str, kind: str):
    """presets[name], or a ValueError that lists the known `kind` presets."""
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; known: {sorted(presets)}")
    return presets[name]


def latent_size(height: int, width: int, vae_stride: int = 8, patch: tuple[int, int] = (2, 2)) -> tuple[int, int]:
    """Pixel (height, width) -> latent (h, w). Raises if the resolution does not tile into patches."""
    step_h, step_w = vae_stride * patch[0], vae_stride * patch[1]
    for name, v, s in (("height", height, step_h), ("width", width, step_w)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
        if v % s:
            raise ValueError(f"{name}={v} is not divisible by {s} (VAE stride {vae_stride} x patch {s // vae_stride})")
    return height // vae_stride, width // vae_stride

"""What lives where: the rows of a memory plan for one choice of knobs, from `memflow_nb.footprint`.

`memflow_nb.planning` tries knob choices over these rows, takes the peaks per phase and says what fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import footprint as fp
from .engine.config import StreamConfig, latent_size
from .hardware import GB, Hardware
from .precision import DtypeLike

STREAMED_BLOCKS = 2  # a streamed text encoder holds one block running and the next one arriving


@dataclass(frozen=True)
class Component:
    """One row of the plan: `bytes` on `where` ("gpu" / "host") during `phase` ("always" or one of `planning.PHASES`)."""

    name: str
    where: str
    dtype: str
    bytes: int
    phase: str
    note: str = ""


def short_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Knobs:
    """The choices a plan is built for (what `load` takes)."""

    fp8_dit: bool
    vae_per_frame: bool
    text_encoder_device: str
    text_encoder_dtype: torch.dtype
    checkpoints_gb: Union[str, float]


@dataclass(frozen=True)
class Job:
    """Everything but the knobs: what runs, at which size, on what."""

    name: str
    cfgs: tuple
    stream: StreamConfig
    height: int
    width: int
    batch: int
    hardware: Hardware
    device: str
    dtype: torch.dtype
    text_dtype: DtypeLike
    seconds: Optional[float]
    prompt_switches: bool


def components(job: Job, k: Knobs) -> tuple[list[Component], int, int]:
    """(rows without the runtime reserves, bytes of one checkpoint, checkpoints every n chunks)."""
    cfg, t5, vae = job.cfgs
    sc, b, e = job.stream, job.batch, job.dtype.itemsize
    lat = latent_size(job.height, job.width)
    on, dt = ("gpu" if job.device == "cuda" else "host"), short_dtype(job.dtype)
    te, tname = k.text_encoder_dtype.itemsize, short_dtype(k.text_encoder_dtype)
    rows = [Component("DiT weights", on, f"fp8+{dt}" if k.fp8_dit else dt, fp.dit_weight_bytes(cfg, e, k.fp8_dit),
                      "always", "LoRA merged" if job.name == "memflow" else "")]
    weights = fp.text_encoder_params(t5) * te
    encode = fp.text_encode_bytes(t5, b, cfg.text_len, te)
    if k.text_encoder_device == "streamed" and job.device != "cuda":
        block = fp.text_block_bytes(t5, te)
        rows.append(Component("text encoder (streamed)", "host", tname, block + encode, "encode",
                              f"1 of {t5.num_layers} blocks at a time from the file, of {weights / GB:.1f} GB"))
    elif k.text_encoder_device == "streamed":
        block = fp.text_block_bytes(t5, te)
        rows += [Component("text encoder (streamed)", "gpu", tname, STREAMED_BLOCKS * block + encode, "encode",
                           f"{STREAMED_BLOCKS} of {t5.num_layers} blocks at a time, of {weights / GB:.1f} GB"),
                 Component("text encoder staging", "host", tname, block, "encode", "one block from the file")]
    else:
        where = "gpu" if k.text_encoder_device == "gpu" else "host"
        rows += [Component("text encoder", where, tname, weights, "always"),
                 Component("text encoding", where, tname, encode, "encode")]
    vcache = fp.vae_cache_bytes(vae, lat, b, e)
    ch = fp.chunk_bytes(cfg, sc, lat, b, e)
    rows += [
        Component("VAE weights", on, dt, fp.vae_weight_bytes(vae, e), "always"),
        Component("VAE decode state", on, dt, vcache, "always", "conv caches kept between chunks"),
        Component("VAE decode workspace", on, dt, fp.vae_decode_bytes(
            vae, lat, b, e, sc.chunk_frames, k.vae_per_frame, job.device),
                  "decode", "frame by frame" if k.vae_per_frame else f"{sc.chunk_frames} latent frames at once"),
        Component("stream state", on, dt, fp.stream_state_bytes(cfg, sc, lat, b, e), "always",
                  "cache, bank, text K/V"),
        Component("attention workspace", on, dt, ch["workspace"], "chunk", f"{fp.workspace_frames(sc)} key frames"),
        Component("chunk keys/values", on, dt, ch["new_kv"] + ch["compress"] + ch["latents"], "chunk",
                  "new K/V, bank copies"),
    ]
    if job.prompt_switches:
        rows.append(Component("prompt switch", on, dt, fp.switch_bytes(cfg, sc, lat, b, e),
                              "prompt switch", f"re-cache of {sc.local_attn_size} frames"))
    if job.seconds:
        from .video import FPS

        frames = int(job.seconds * FPS) * b * job.height * job.width * 3
        rows.append(Component("video frames", "host", "uint8", 2 * frames, "always",
                              f"{job.seconds:g} s kept by generate_video, twice while joined"))
    copied = job.device == "cuda"  # Checkpoints.auto: every 8th chunk, copied to the host, on a GPU
    return rows, fp.checkpoint_bytes(cfg, sc, lat, b, e, vcache, copied), (8 if copied else 1)

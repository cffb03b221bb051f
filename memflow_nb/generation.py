"""Timeline-driven streaming generation, with chunk-boundary checkpoints for fork and resume.

`generate` yields each chunk's frames as soon as they are decoded. Every chunk's noise comes from
(seed, chunk index) and its conditioning from the timeline alone, so replaying from any saved
checkpoint reproduces the original frames bit for bit; `resume` uses this to reach any chunk
from the nearest checkpoint kept, which is what makes sparse checkpoints enough.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from .stream import State, init_state, set_prompt, state_to, step
from .conditioning import chunk_embeddings
from .timeline import Timeline
from .decode import decode_chunk as decode, init_decode_state as init_vae, to_uint8
from .decode.vae import VAEDecodeState
from .video import FPS


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue at the start of chunk `chunk`."""

    chunk: int
    state: Optional[State]  # None before chunk 0
    vae_state: VAEDecodeState
    seed: int
    size: tuple[int, int]  # (height, width) in pixels

    def to(self, device) -> "Checkpoint":
        state = state_to(self.state, device) if self.state is not None else None
        caches = tuple(c.to(device) if c is not None else None for c in self.vae_state.caches)
        return dataclasses.replace(self, state=state, vae_state=dataclasses.replace(self.vae_state, caches=caches))


@dataclass(frozen=True)
class Chunk:
    """One generated chunk: frames uint8 [T, H, W, 3] (9 for chunk 0, 12 after), latents [1, f, C, h, w]."""

    index: int
    frames: np.ndarray
    latents: torch.Tensor
    state: State
    vae_state: VAEDecodeState
    switched: bool  # the prompt changed (KV re-cache) before this chunk

    def checkpoint(self) -> Checkpoint:
        h, w = self.state.latent_hw
        return Checkpoint(self.index + 1, self.state, self.vae_state, self.state.seed, (h * 8, w * 8))


class Checkpoints:
    """Checkpoints kept while generating: chunk 0 and every `every`-th chunk boundary.

    States share unchanged tensors, so keeping every boundary on the model's device costs about
    one chunk of keys/values per checkpoint; with `device="cpu"` they are copied off the GPU
    (each then holds its own copy of the whole context). `resume` replays from the nearest one.
    """

    def __init__(self, every: int = 1, device=None):
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.every, self.device = every, device
        self._store: dict[int, Checkpoint] = {}

    @classmethod
    def auto(cls, pipe) -> "Checkpoints":
        """Every chunk on a CPU model; every 8th chunk, kept in CPU memory, for a model on a GPU."""
        dev = _device(pipe)
        return cls(every=1) if dev.type == "cpu" else cls(every=8, device="cpu")

    def add(self, ck: Checkpoint, force: bool = False) -> None:
        if force or ck.chunk % self.every == 0:
            self._store[ck.chunk] = ck.to(self.device) if self.device is not None else ck

    def nearest(self, chunk: int) -> Checkpoint:
        """The kept checkpoint with the largest chunk <= `chunk`."""
        keys = [k for k in self._store if k <= chunk]
        if not keys:
            raise KeyError(f"no checkpoint at or before chunk {chunk}")
        return self._store[max(keys)]

    def truncate(self, chunk: int) -> None:
        """Forget checkpoints after `chunk` (they belong to a branch being replaced)."""
        for k in [k for k in self._store if k > chunk]:
            del self._store[k]

    def chunks(self) -> list[int]:
        return sorted(self._store)

    def nbytes(self) -> int:
        """Bytes held by all checkpoints, shared storage counted once."""
        seen, total = set(), 0
        for ck in self._store.values():
            ts = list(ck.vae_state.caches)
            if ck.state is not None:
                s = ck.state
                ts += [s.prompt_embeds, s.text_kv, s.history, s.pending] + [t for _, t in s.cache] + list(s.bank)
            for t in ts:
                if t is None:
                    continue
                st = t.untyped_storage()
                if (st.data_ptr(), t.device) not in seen:
                    seen.add((st.data_ptr(), t.device))
                    total += st.nbytes()
        return total

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class Video:
    """A whole generated video: frames uint8 [T, H, W, 3] at `fps`, latents [1, F, C, h, w]."""

    frames: np.ndarray
    latents: torch.Tensor
    fps: int
    seed: int
    timeline: Timeline
    checkpoints: Checkpoints
    seconds: float  # wall time spent generating
    switches: list[int] = field(default_factory=list)  # chunks that started with a prompt switch

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


def _device(pipe) -> torch.device:
    return next(pipe.model.parameters()).device


def render_size(pipe, timeline: Timeline, height: Optional[int] = None, width: Optional[int] = None) -> tuple[int, int]:
    """(height, width) of a video: the call's, else the timeline's, else the pipeline's default.

    A random-weight pipeline ("tiny") skips the timeline's size: noise needs no pixels, and its
    small default keeps the CPU run short (the CLI and the API agree on this rule).
    """
    dh, dw = getattr(pipe, "default_size", (480, 832))
    if getattr(pipe, "random_weights", False):
        return (height or dh), (width or dw)
    return (height or timeline.height or dh), (width or timeline.width or dw)


def generate(pipe, timeline: Timeline, *, seed: Optional[int] = None, height: Optional[int] = None,
             width: Optional[int] = None, num_chunks: Optional[int] = None, start: Optional[Checkpoint] = None,
             checkpoints: Optional[Checkpoints] = None, progress: bool = True) -> Iterator[Chunk]:
    """Stream a timeline: yields a `Chunk` as soon as its frames are decoded.

    Args:
        pipe: a loaded pipeline (`memflow_nb.load(...)`): model, text encoder, VAE, stream config.
        timeline: prompts over time; its seed / resolution / step list are used unless overridden.
        num_chunks: how many chunks to make in total (default: the timeline's length; past its end
            the last segment continues).
        start: continue from this checkpoint instead of chunk 0 (chunks before it are not redone).
        checkpoints: a store to fill at chunk boundaries (see `Checkpoints`); on a resume, its
            checkpoints after `start` are dropped, since the new branch replaces them.
    """
    model, vae = pipe.model, pipe.vae
    stream = pipe.stream
    if timeline.denoising_steps:
        stream = stream.replace(denoising_steps=tuple(timeline.denoising_steps))
    total = timeline.num_chunks if num_chunks is None else int(num_chunks)
    if total < 1:
        raise ValueError(f"num_chunks={total} must be >= 1")
    dev = _device(pipe)
    if start is None:
        seed = seed if seed is not None else (timeline.seed if timeline.seed is not None else 0)
        start = Checkpoint(0, None, init_vae(vae), int(seed), render_size(pipe, timeline, height, width))
    else:
        if (height or width) and (height, width) != start.size:
            raise ValueError(f"cannot resume a {start.size[0]}x{start.size[1]} stream at {height}x{width}")
        start = start.to(dev)
        if seed is not None and seed != start.seed:  # same past, new noise from here on
            state = dataclasses.replace(start.state, seed=int(seed)) if start.state is not None else None
            start = dataclasses.replace(start, seed=int(seed), state=state)
    if checkpoints is not None:
        checkpoints.truncate(start.chunk)
        checkpoints.add(start, force=start.chunk == 0)
    (h, w), seed = start.size, start.seed
    state, vae_state = start.state, start.vae_state
    conditioning = _conditioning(pipe, timeline)
    bar = _progress(progress, total, start.chunk, getattr(pipe, "name", ""))
    try:
        for c in range(total):
            emb = next(conditioning)
            if c < start.chunk:
                continue
            switched = False
            if state is None:
                state = init_state(model, stream, emb, height=h, width=w, seed=seed)
            elif not torch.equal(emb.to(state.prompt_embeds.device, state.prompt_embeds.dtype), state.prompt_embeds):
                state, switched = set_prompt(model, state, emb), True
            state, x0 = step(model, state)
            vp = next(vae.parameters())
            pixels, vae_state = decode(vae, x0.to(vp.device, vp.dtype), vae_state)
            out = Chunk(c, to_uint8(pixels[0]), x0, state, vae_state, switched)
            if checkpoints is not None:
                checkpoints.add(out.checkpoint())
            if bar is not None:
                bar.update(1)
            yield out
    finally:
        if bar is not None:
            bar.close()


def generate_video(pipe, timeline: Timeline, *, checkpoints: Optional[Checkpoints] = None, **kw) -> Video:
    """Generate a whole timeline and collect it (see `generate` for the arguments)."""
    checkpoints = checkpoints if checkpoints is not None else Checkpoints.auto(pipe)
    t0 = time.perf_counter()
    frames, latents, switches, seed = [], [], [], None
    for ch in generate(pipe, timeline, checkpoints=checkpoints, **kw):
        frames.append(ch.frames)
        latents.append(ch.latents.cpu())
        seed = ch.state.seed
        if ch.switched:
            switches.append(ch.index)
    return Video(np.concatenate(frames), torch.cat(latents, dim=1), FPS, seed, timeline, checkpoints,
                 time.perf_counter() - t0, switches)


def resume(pipe, timeline: Timeline, checkpoints: Checkpoints, chunk: int, *, progress: bool = False) -> Checkpoint:
    """The checkpoint at the start of `chunk` of the video `timeline` produced.

    Replays from the nearest kept checkpoint (bit-exact, since noise and conditioning depend only
    on the chunk index). Then `generate(pipe, new_timeline, start=ck)` regenerates from there.
    """
    ck = checkpoints.nearest(chunk)
    if ck.chunk == chunk:
        return ck.to(_device(pipe))
    last = None
    for last in generate(pipe, timeline, start=ck, num_chunks=chunk, progress=progress):
        pass
    return last.checkpoint()


def _conditioning(pipe, timeline: Timeline) -> Iterator[torch.Tensor]:
    """Prompt embeddings per chunk: each distinct text encoded once; past the end, the last one."""
    last = None
    for _, emb, _ in chunk_embeddings(timeline, lambda text: pipe.text([text])):
        last = emb
        yield emb
    while True:
        yield last


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="chunk", desc=f"generate{' (' + name + ')' if name else ''}")

"""Timeline-driven streaming generation, with chunk-boundary checkpoints for fork and resume.

`generate` yields each chunk's frames as soon as they are decoded. Every chunk's noise comes from
(seed, chunk index) and its conditioning from the timeline alone, so replaying from any saved
checkpoint reproduces the original frames bit for bit; `resume` uses this to reach any chunk
from the nearest checkpoint kept, which is what makes sparse checkpoints enough. A `Session`
holds one video being made: the chunks so far, stop, and regenerate from any chunk.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch

from .checkpoints import Checkpoint, Checkpoints
from .decode import decode_chunk as decode, init_decode_state as init_vae, to_uint8
from .engine.checks import check_seed
from .engine.config import latent_size
from .engine.state import State
from .engine.steps import init_state, set_prompt, step
from .timeline.clock import FPS
from .timeline.conditioning import ChunkConditioning, Conditioning, Embeddings, conditioning_plan
from .timeline.model import Timeline


@dataclass(frozen=True)
class Chunk:
    """One generated chunk: frames uint8 [T, H, W, 3] (9 for chunk 0, 12 after), latents [1, f, C, h, w]."""

    index: int
    frames: np.ndarray
    latents: torch.Tensor
    state: State
    vae_state: Any  # the decoder's state after this chunk
    switched: bool  # the prompt changed (KV re-cache) before this chunk
    conditioning: Optional[Conditioning] = None  # what this chunk was conditioned on (the timeline's plan)

    def checkpoint(self) -> Checkpoint:
        """Where the stream stands after this chunk: `generate(start=...)` continues from it."""
        size = tuple(self.frames.shape[1:3])
        return Checkpoint(self.index + 1, self.state, self.vae_state, self.state.seed, size, self.conditioning)


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

    A random-weight pipeline ("tiny") takes the timeline's size only when it fits inside its own
    small default: noise needs no pixels, and a file's 480x832 would only make the CPU run slow
    (the CLI, the editor and the API all size videos with this one rule).
    """
    dh, dw = getattr(pipe, "default_size", (480, 832))
    th, tw = timeline.height, timeline.width  # the timeline gives both or neither
    if th is None or (getattr(pipe, "random_weights", False) and (th > dh or tw > dw)):
        th, tw = dh, dw
    if (height is None) != (width is None):
        raise ValueError(f"give both height and width, or neither (got height={height}, width={width})")
    if height is None:
        return th, tw
    latent_size(height, width)  # a positive multiple of 16 each: 0 is refused, not taken as "not given"
    return height, width


def _seed(seed: Optional[int], timeline: Timeline, default: int) -> int:
    if seed is not None:
        check_seed(seed)  # an int: 1.9, True or "1" would quietly become another seed
    """The noise seed: the call's, else the timeline's, else `default`."""
    return int(seed if seed is not None else timeline.seed if timeline.seed is not None else default)


def generate(pipe, timeline: Timeline, *, seed: Optional[int] = None, height: Optional[int] = None,
             width: Optional[int] = None, num_chunks: Optional[int] = None, start: Optional[Checkpoint] = None,
             checkpoints: Optional[Checkpoints] = None, progress: bool = True) -> Iterator[Chunk]:
    """Stream a timeline: yields a `Chunk` as soon as its frames are decoded.

    Args:
        pipe: a loaded pipeline (`memflow_nb.load(...)`): model, text encoder, VAE, stream config.
        timeline: prompts over time; its seed / resolution / step list are used unless overridden.
        num_chunks: how many chunks to make in total (default: the timeline's length; past its end
            the last segment continues).
        start: continue from this checkpoint instead of chunk 0 (chunks before it are not redone,
            and the prompts only they use are not encoded).
        checkpoints: a store to fill at chunk boundaries (see `Checkpoints`); on a resume, its
            checkpoints after `start` are dropped, since the new branch replaces them.
    """
    model, vae = pipe.model, pipe.vae
    stream = pipe.stream
    if timeline.denoising_steps:
        stream = stream.replace(denoising_steps=tuple(timeline.denoising_steps))
    total = _num_chunks(timeline, num_chunks)
    if start is None:
        size = render_size(pipe, timeline, height, width)
        plan = getattr(pipe, "plan", None)
        if plan is not None and size != (plan.height, plan.width):
            plan.resized(*size).check()  # PlanError (which part, by how much, the fixes) before any work
        start = Checkpoint(0, None, init_vae(vae), _seed(seed, timeline, 0), size)
    else:
        if (height or width) and (height, width) != start.size:
            raise ValueError(f"cannot resume a {start.size[0]}x{start.size[1]} stream at {height}x{width}")
        start = start.to(_device(pipe))
        if seed is not None:
            check_seed(seed)
        if seed is not None and seed != start.seed:  # same past, new noise from here on
            state = dataclasses.replace(start.state, seed=int(seed)) if start.state is not None else None
            start = dataclasses.replace(start, seed=int(seed), state=state)
    if start.chunk >= total:
        raise ValueError(f"start is after chunk {start.chunk - 1} and num_chunks={total}: nothing to make; "
                         f"num_chunks counts from the video's start, so give more than {start.chunk}")
    if checkpoints is not None:
        checkpoints.truncate(start.chunk)
        checkpoints.add(start, force=start.chunk == 0)
    (h, w), seed = start.size, start.seed
    state, vae_state = start.state, start.vae_state
    embeddings = Embeddings(lambda text: pipe.text([text]))
    plan = list(_plan(timeline, start, total))
    if hasattr(pipe.text, "encode_all"):  # in one batch: a streamed text encoder reads its file once
        pipe.text.encode_all(list(dict.fromkeys(t for cc in plan for t in cc.texts)))
    # The plan's low-memory decode (one latent frame at a time: the same pixels, a smaller workspace).
    per_frame = bool(getattr(getattr(pipe, "plan", None), "vae_per_frame", False))
    bar = _progress(progress, total, start.chunk, getattr(pipe, "name", ""))
    try:
        for cc in plan:  # prompts are encoded only where a chunk needs them
            if state is None:
                state = init_state(model, stream, embeddings(cc.conditioning)[None], height=h, width=w, seed=seed)
            elif cc.changed:
                state = set_prompt(model, state, embeddings(cc.conditioning)[None])
            state, x0 = step(model, state)
            vp = next(vae.parameters())
            pixels, vae_state = decode(vae, x0.to(vp.device, vp.dtype), vae_state, per_frame=per_frame)
            out = Chunk(cc.chunk, to_uint8(pixels[0]), x0, state, vae_state, cc.changed, cc.conditioning)
            if checkpoints is not None:
                checkpoints.add(out.checkpoint())
            if bar is not None:
                bar.update(1)
            yield out
    finally:
        if bar is not None:
            bar.close()


def _plan(timeline: Timeline, start: Checkpoint, total: int) -> Iterator[ChunkConditioning]:
    """The conditioning of chunks `start.chunk` to `total - 1`; past the timeline's end its last
    chunk's continues. `changed` is the plan's own flag, except at a resume, where it compares
    with what the checkpoint's state was conditioned on (it may come from another timeline)."""
    plan = conditioning_plan(timeline)
    for c in range(start.chunk, total):
        cc = plan[min(c, len(plan) - 1)]
        if c == start.chunk:
            changed = start.state is not None and (start.conditioning is None or cc.conditioning != start.conditioning)
        else:
            changed = cc.changed and c < len(plan)
        yield dataclasses.replace(cc, chunk=c, changed=changed)


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


class SessionError(ValueError):
    """A request a `Session` cannot do as asked; the message says why and what to do instead."""


class _Span(NamedTuple):
    first: int  # the first chunk made from `timeline` with `seed`
    timeline: Timeline
    seed: int


class Session:
    """One video made chunk by chunk from timelines: stop it, then regenerate it from any chunk.

    It holds the chunks made so far (their frames when `keep_frames`), which timeline and seed made
    each of them, the checkpoints to go back to, and a stop flag that a run checks before each
    chunk, so another thread (a Stop button, a signal handler) can end it between chunks. The
    notebook editor, the CLI and scripts all generate through it.

        session = Session(pipe)
        for chunk in session.generate(timeline):           # `Chunk`s, as they are made
            ...
        for chunk in session.regenerate_from(5, edited):   # chunks 0-4 stay as they were, bit for bit
            ...
        session.frames                                     # uint8 [T, H, W, 3]

    Args:
        pipe: a loaded pipeline (`memflow_nb.load(...)`).
        checkpoints: where to keep checkpoints: "auto" (`Checkpoints.auto(pipe)`), a `Checkpoints`,
            or None (keep none: memory stays flat, and `regenerate_from` replays from chunk 0).
        keep_frames: keep every chunk's frames for `frames` (off for long streams written to a file).
        progress: show a progress bar for each run.
    """

    def __init__(self, pipe, *, checkpoints: Union[Checkpoints, str, None] = "auto", keep_frames: bool = True,
                 progress: bool = False):
        self.pipe = pipe
        if isinstance(checkpoints, str) and checkpoints != "auto":
            raise ValueError(f"checkpoints={checkpoints!r}: give 'auto', a Checkpoints or None")
        self.checkpoints = Checkpoints.auto(pipe) if checkpoints == "auto" else checkpoints
        self.keep_frames, self.progress = keep_frames, progress
        self.size: Optional[tuple[int, int]] = None  # (height, width) of the video, fixed by generate()
        self._spans: list[_Span] = []
        self._frames: list[np.ndarray] = []  # per chunk, uint8 [t, H, W, 3] (empty without keep_frames)
        self._switched: list[bool] = []  # per chunk made
        self._stop = threading.Event()
        self._running = False

    def __len__(self) -> int:
        """Chunks made so far."""
        return len(self._switched)

    @property
    def timeline(self) -> Optional[Timeline]:
        """The timeline the latest chunks were made from (None before the first run)."""
        return self._spans[-1].timeline if self._spans else None

    @property
    def frames(self) -> Optional[np.ndarray]:
        """The video made so far, uint8 [T, H, W, 3] (None before the first chunk or without keep_frames)."""
        return np.concatenate(self._frames) if self._frames else None

    @property
    def switches(self) -> list[int]:
        """The chunks made so far that started with a prompt switch."""
        return [k for k, switched in enumerate(self._switched) if switched]

    def stop(self) -> None:
        """Make the running generation end before its next chunk (the chunk in progress is finished)."""
        self._stop.set()

    def generate(self, timeline: Timeline, *, seed: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None, num_chunks: Optional[int] = None) -> Iterator[Chunk]:
        """A new video (the one made so far is dropped once this run starts): yields its chunks.

        seed, height, width, num_chunks: as for `generate` (the call's, else the timeline's, else
        the default; `render_size` gives the size).
        """
        self._refuse_if_running()
        span = _Span(0, timeline, _seed(seed, timeline, 0))
        size = render_size(self.pipe, timeline, height, width)
        self._stop.clear()
        return self._run(span, size, _num_chunks(timeline, num_chunks))

    def regenerate_from(self, chunk: int, timeline: Optional[Timeline] = None, *, seed: Optional[int] = None,
                        height: Optional[int] = None, width: Optional[int] = None,
                        num_chunks: Optional[int] = None) -> Iterator[Chunk]:
        """Keep the chunks before `chunk` and make the rest from `timeline`: yields the new chunks.

        timeline: what to make from `chunk` on (default: the latest one).
        seed: noise from `chunk` on (default: the timeline's if it names one, else the seed in effect).
        height, width: the size asked for (checked: a video keeps its size).
        num_chunks: the video's new length (default: the timeline's).
        The chunks before `chunk` are not remade: the stream is replayed from the nearest kept
        checkpoint with the timelines and seeds that made them, so it continues them bit for bit.
        """
        self._refuse_if_running()
        if not self._spans:
            raise SessionError("generate a video first; then choose the chunk to regenerate from")
        if not 0 <= chunk <= len(self):
            raise SessionError(f"chunk {chunk} is outside the video made so far (chunks 0 to {len(self) - 1})")
        timeline = timeline if timeline is not None else self.timeline
        size = render_size(self.pipe, timeline, height, width)
        if size != self.size:
            raise SessionError(f"the size changed ({self.size[0]}x{self.size[1]} -> {size[0]}x{size[1]}): "
                               "a video keeps its size; generate a new one")
        total = _num_chunks(timeline, num_chunks)
        if total <= chunk:
            raise SessionError(f"the timeline now has {total} chunk(s); nothing to make from chunk {chunk}")
        span = _Span(chunk, timeline, _seed(seed, timeline, self._span_at(max(0, min(chunk, len(self) - 1))).seed))
        self._stop.clear()
        return self._run(span, size, total)

    def _refuse_if_running(self) -> None:
        if self._running:
            raise SessionError("already generating: stop() the run in progress or let it finish first")

    def _run(self, span: _Span, size: tuple[int, int], total: int) -> Iterator[Chunk]:
        self._refuse_if_running()
        self._running = True
        try:
            start = self._replay_to(span.first) if span.first > 0 else None
            # From here on the new branch replaces the chunks from span.first.
            del self._frames[span.first:], self._switched[span.first:]
            self._spans = [s for s in self._spans if s.first < span.first] + [span]
            self.size = size
            chunks = generate(self.pipe, span.timeline, seed=span.seed, height=size[0], width=size[1],
                              num_chunks=total, start=start, checkpoints=self.checkpoints, progress=self.progress)
            try:
                while not self._stop.is_set():
                    ch = next(chunks, None)
                    if ch is None:
                        break
                    if self.keep_frames:
                        self._frames.append(ch.frames)
                    self._switched.append(ch.switched)
                    yield ch
            finally:
                chunks.close()  # a run left early ends now, not at garbage collection
        finally:
            self._running = False

    def _span_at(self, chunk: int) -> _Span:
        return [s for s in self._spans if s.first <= chunk][-1]

    def _replay_to(self, chunk: int) -> Checkpoint:
        """The checkpoint at the start of `chunk`: the nearest kept one, then the chunks between
        made again, each with the timeline and seed that first made it."""
        kept = self.checkpoints is not None and any(k <= chunk for k in self.checkpoints.chunks())
        ck = self.checkpoints.nearest(chunk) if kept else None
        at = ck.chunk if ck is not None else 0
        while at < chunk:
            span = self._span_at(at)
            end = min([chunk] + [s.first for s in self._spans if s.first > at])
            for last in generate(self.pipe, span.timeline, seed=span.seed, height=self.size[0], width=self.size[1],
                                 num_chunks=end, start=ck, progress=False):
                pass
            ck, at = last.checkpoint(), end
        return ck


def _num_chunks(timeline: Timeline, num_chunks: Optional[int]) -> int:
    if num_chunks is not None and (isinstance(num_chunks, bool) or not isinstance(num_chunks, (int, np.integer))):
        raise TypeError(f"num_chunks must be an integer, got {num_chunks!r}")
    total = timeline.num_chunks if num_chunks is None else int(num_chunks)
    if total < 1:
        raise ValueError(f"num_chunks={total} must be >= 1")
    return total


def _progress(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="chunk", desc=f"generate{' (' + name + ')' if name else ''}")

"""Stream checkpoints: where a generation stands at a chunk boundary, kept to fork and resume.

(Not weight files.) A checkpoint holds the engine state, the
decoder state and what the chunk before it was conditioned on, so `generate(start=...)` continues
bit for bit; `Checkpoints` keeps some of them while generating.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .decode import tensor_bytes
from .engine.state import State, state_to
from .timeline.conditioning import Conditioning


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue at the start of chunk `chunk`.

    vae_state: the decoder's state (a Wan VAE or TAE decode state: both have `.to` and `.tensors`).
    conditioning: what chunk `chunk - 1` was conditioned on (None before chunk 0, or unknown: then
        the prompt is set again at a resume); `generate` compares it with the timeline's conditioning
        of `chunk` to decide whether the prompt switches there.
    """

    chunk: int
    state: Optional[State]  # None before chunk 0
    vae_state: Any
    seed: int
    size: tuple[int, int]  # (height, width) in pixels
    conditioning: Optional[Conditioning] = None

    def to(self, device) -> "Checkpoint":
        """The same checkpoint with the engine and decoder tensors on `device`."""
        state = state_to(self.state, device) if self.state is not None else None
        return dataclasses.replace(self, state=state, vae_state=self.vae_state.to(device))

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this checkpoint holds (shared ones may repeat)."""
        ts = list(self.vae_state.tensors())
        if self.state is not None:
            s = self.state
            ts += [s.prompt_embeds, s.text_kv, s.history] + [t for _, t in s.cache] + list(s.bank)
            ts += [s.pending] if s.pending is not None else []
        return ts


DEFAULT_MAX_COUNT = 64  # checkpoints kept besides chunk 0's when no plan says how many fit


def cuda_device(ck: Checkpoint) -> Optional[torch.device]:
    """The CUDA device `ck`'s tensors are on, or None (all on the CPU)."""
    return next((t.device for t in ck.tensors() if t.is_cuda), None)


def after_queued_work(device: torch.device) -> torch.cuda.Event:
    """An event that passes once the work queued so far on `device`'s current stream is done."""
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return ready


STAGING_BYTES = 64 * 2 ** 20  # the pinned buffer a host copy goes through, piece by piece


def copy_to_host(ck: Checkpoint, device: torch.device, ready: torch.cuda.Event) -> Checkpoint:
    """`ck` with its tensors in ordinary host memory, copied on a side CUDA stream of `device` once
    `ready` (an event recorded after the work that made `ck`) has passed; returns when it is done.

    The engine state goes through one small pinned buffer: pinning gigabytes per checkpoint
    (what a non-blocking ``Tensor.to("cpu")`` does) stalled the GPU's other work for seconds."""
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_event(ready)
        staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)

        def move(t: torch.Tensor) -> torch.Tensor:
            src = t.contiguous().view(-1).view(torch.uint8)
            out = torch.empty(t.shape, dtype=t.dtype)
            dst = out.view(-1).view(torch.uint8)
            for i in range(0, src.numel(), STAGING_BYTES):
                n = min(STAGING_BYTES, src.numel() - i)
                staging[:n].copy_(src[i:i + n], non_blocking=True)
                stream.synchronize()
                dst[i:i + n].copy_(staging[:n])
            return out

        with torch.cuda.stream(stream):
            state = state_to(ck.state, "cpu", move) if ck.state is not None else None
            vae_state = ck.vae_state.to("cpu")  # small; a plain (pageable) copy on this stream
        stream.synchronize()
    return dataclasses.replace(ck, state=state, vae_state=vae_state)


class Checkpoints:
    """Checkpoints kept while generating: chunk 0 and every `every`-th chunk boundary.

    States share unchanged tensors, so keeping every boundary on the model's device costs about
    one chunk of keys/values per checkpoint; with `device="cpu"` they are copied off the GPU
    (each then holds its own copy of the whole context). That copy (gigabytes at 832x480) runs in a
    background thread on its own CUDA stream while the next chunks compute; states are immutable,
    so it reads what they held. `nearest` and `nbytes` wait for the copies they need.
    `resume` replays from the nearest one.
    """

    def __init__(self, every: int = 1, device=None, max_count: Optional[int] = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an integer >= 1")
        if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0):
            raise ValueError(f"max_count={max_count!r} must be None (no limit) or an integer >= 0")
        self.every, self.device, self.max_count = every, device, max_count
        self._store: dict[int, Union[Checkpoint, Future]] = {}
        self._copier: Optional[ThreadPoolExecutor] = None  # one thread: host copies run in order

    @classmethod
    def auto(cls, pipe) -> "Checkpoints":
        """What the pipeline's memory plan has room for (`pipe.plan`): every `checkpoints_every`-th
        chunk, at most `max_checkpoints` besides chunk 0's, in host memory for a model on a GPU.
        Without a plan: every chunk on a CPU model, every 8th on a GPU, and at most
        `DEFAULT_MAX_COUNT` of them either way, so an endless stream keeps flat memory."""
        dev = next(pipe.model.parameters()).device
        plan = getattr(pipe, "plan", None)
        device = None if dev.type == "cpu" else "cpu"
        if plan is not None:
            cap = min(plan.max_checkpoints, DEFAULT_MAX_COUNT) if plan.max_checkpoints >= 0 else DEFAULT_MAX_COUNT
            return cls(every=plan.checkpoints_every, device=device, max_count=cap)
        return cls(every=1 if dev.type == "cpu" else 8, device=device, max_count=DEFAULT_MAX_COUNT)

    def add(self, ck: Checkpoint, force: bool = False) -> None:
        """Keep `ck` if it falls on the schedule (or `force`); past `max_count`, the oldest kept
        checkpoint after chunk 0 is dropped (resume then replays from an earlier one, bit-exact)."""
        if force or ck.chunk % self.every == 0:
            self._store[ck.chunk] = self._moved(ck)
            later = sorted(k for k in self._store if k > 0)
            while self.max_count is not None and len(later) > self.max_count:
                del self._store[later.pop(0)]

    def _moved(self, ck: Checkpoint) -> Union[Checkpoint, Future]:
        """`ck` on this store's device: at once, or (GPU -> host) a Future of the background copy."""
        if self.device is None:
            return ck
        target = torch.device(self.device)
        gpu = cuda_device(ck)
        if target.type != "cpu" or gpu is None:
            return ck.to(target)
        ready = after_queued_work(gpu)
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memflow-checkpoint")
        return self._copier.submit(copy_to_host, ck, gpu, ready)

    def _get(self, chunk: int) -> Checkpoint:
        kept = self._store[chunk]
        if isinstance(kept, Future):
            kept = self._store[chunk] = kept.result()  # a failed copy raises here, where it is needed
        return kept

    def nearest(self, chunk: int) -> Checkpoint:
        """The kept checkpoint with the largest chunk <= `chunk` (waits for its host copy if still running)."""
        keys = [k for k in self._store if k <= chunk]
        if not keys:
            raise KeyError(f"no checkpoint at or before chunk {chunk}")
        return self._get(max(keys))

    def truncate(self, chunk: int) -> None:
        """Forget checkpoints after `chunk` (they belong to a branch being replaced)."""
        for k in [k for k in self._store if k > chunk]:
            del self._store[k]

    def chunks(self) -> list[int]:
        return sorted(self._store)

    def nbytes(self) -> int:
        """Bytes held by all checkpoints, shared storage counted once."""
        return tensor_bytes(t for k in list(self._store) for t in self._get(k).tensors())

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        """What is kept, and what will be: the schedule, the cap, where, how many and how much."""
        kept = self.chunks()
        span = "none" if not kept else f"chunks {kept[0]}" + (f", {kept[1]}..{kept[-1]}" if len(kept) > 1 else "")
        cap = "no limit" if self.max_count is None else f"at most {self.max_count} besides chunk 0's"
        where = "on the model's device" if self.device is None else f"on {self.device}"
        # Never waits (a repr in a notebook must not block): copies still running are counted apart.
        pending = [k for k, v in self._store.items() if isinstance(v, Future) and not v.done()]
        failed = [k for k, v in self._store.items() if isinstance(v, Future) and v.done() and v.exception()]
        ready = [k for k in kept if k not in pending and k not in failed]
        size = tensor_bytes(t for k in ready for t in self._get(k).tensors()) / 2 ** 20
        more = (f", {len(pending)} still copying" if pending else "") + (f", {len(failed)} failed" if failed else "")
        return (f"Checkpoints(every {self.every} chunk{'s' * (self.every != 1)}, {cap}, {where}: "
                f"{len(kept)} kept, {span}, {size:.1f} MiB{more})")

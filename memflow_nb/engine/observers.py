"""Observers: values that see the engine's attention and bank refreshes without changing them.

An observer has three methods (`memflow_nb.recording.AttentionRecording` is one):

    self_attention(info, layer, q, k, sma_frames=None)  q [B, Lq, H, D]; k [B, H, Lk, D] as attended
    cross_attention(info, layer, q, k)                   q [B, Lq, H, D]; text keys k [B, Ltxt, H, D]
    memory_event(event)                                  a `memory.MemoryEvent`

Give them to one call (`step(model, state, observers=[...])`), or bind them to one model for the
current thread with `model.observers.bound(...)` (what `record_attention(model)` does): a binding
belongs to that model instance and that thread, so a recording never sees another model, or
another thread stepping the same model.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch


@dataclass(frozen=True)
class PassInfo:
    """What an observer is told about the pass whose attention it sees."""

    chunk: int  # chunk index the pass belongs to (a re-cache belongs to the chunk that follows it)
    kind: str  # "denoise", "clean" or "recache"
    step: int  # denoising step index, -1 for clean / re-cache passes
    frames: tuple[int, int]  # query frames [p0, p1)
    key_frames: tuple  # per key frame, in key order: (group, frame, slot), see memflow_nb.recording
    bank_frames: torch.Tensor  # [L, B, n] source frame per bank slot (per layer)
    tokens_per_frame: int
    blocked: Optional[torch.Tensor] = None  # [L, B, H, n_key_frames] True: masked out (engine/masks.py)


class Observer(Protocol):
    def self_attention(self, info: PassInfo, layer: int, q: torch.Tensor, k: torch.Tensor,
                       sma_frames=None) -> None: ...

    def cross_attention(self, info: PassInfo, layer: int, q: torch.Tensor, k: torch.Tensor) -> None: ...

    def memory_event(self, event) -> None: ...


class ObserverBindings:
    """The observers bound to one model, per thread. Every model has one (`model.observers`)."""

    def __init__(self):
        self._by_thread: dict[int, tuple[Observer, ...]] = {}

    def current(self) -> tuple[Observer, ...]:
        """The observers bound in the calling thread."""
        return self._by_thread.get(threading.get_ident(), ())

    @contextmanager
    def bound(self, *observers: Observer) -> Iterator[None]:
        """Bind `observers` to this model in the calling thread while the block runs."""
        tid = threading.get_ident()
        self._by_thread[tid] = self.current() + observers
        try:
            yield
        finally:
            rest = tuple(o for o in self._by_thread.get(tid, ()) if not any(o is b for b in observers))
            if rest:
                self._by_thread[tid] = rest
            else:
                self._by_thread.pop(tid, None)

    def __bool__(self) -> bool:
        return bool(self._by_thread)

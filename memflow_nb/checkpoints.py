"""Stream checkpoints: where a generation stands at a chunk boundary, kept to fork and resume.

(Not weight files.) A checkpoint holds the engine state, the
decoder state and what the chunk before it was conditioned on, so `generate(start=...)` continues
bit for bit; `Checkpoints` keeps some of them while generating.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch

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
        dev = next(pipe.model.parameters()).device
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
            for t in ck.tensors():
                st = t.untyped_storage()
                if (st.data_ptr(), t.device) not in seen:
                    seen.add((st.data_ptr(), t.device))
                    total += st.nbytes()
        return total

    def __len__(self) -> int:
        return len(self._store)

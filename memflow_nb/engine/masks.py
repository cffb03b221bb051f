"""Attention masks over key frames: ablations and skipped empty bank slots.

A mask never deletes data: the bank and the sink keep their keys and values, a pass only stops
attending to some key frames. `blocked` is [L, B, H, n_key_frames] bool, True where layer l,
batch item b and head h do not attend to that key frame. Key frames blocked for every batch item
and head of a layer are left out of that layer's keys (so attention is exactly that of a context
without them); the others get an additive -inf bias.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

GROUPS = ("bank", "sink")


@dataclass(frozen=True, eq=False)
class Ablation:
    """Key frames of `group` ("bank" or "sink") masked for heads[l, h] in chunks [first_chunk, end_chunk)."""

    group: str
    heads: torch.Tensor  # [L, H] bool
    first_chunk: int
    end_chunk: Optional[int] = None  # None: for good

    def active(self, chunk: int) -> bool:
        return self.first_chunk <= chunk and (self.end_chunk is None or chunk < self.end_chunk)


@dataclass(frozen=True, eq=False)
class LayerMask:
    """One layer's mask, ready for attention: keep (token indices of the key frames some head
    still sees, or None for all) and the additive bias [B, H, 1, n_kept * T] for the rest (or None)."""

    keep: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def key_mask(state, labels: Sequence[tuple], chunk: int, num_heads: int) -> Optional[torch.Tensor]:
    """blocked [L, B, H, n] for a pass of chunk `chunk` whose key frames are `labels`
    ((group, frame, slot) each), or None when nothing is masked.

    Bank slots emptied in some layers (frame -1) are masked there when the stream skips empty
    frames; the state's active ablations mask their group in their layers and heads.
    """
    if state.stream.empty_frames != "skip" and not any(ab.active(chunk) for ab in state.ablations):
        return None
    frames = state.bank_frames  # [L, B, n_slots]
    L, B = frames.shape[:2]
    blocked = torch.zeros(L, B, num_heads, len(labels), dtype=torch.bool)
    if state.stream.empty_frames == "skip":
        for i, (group, _, slot) in enumerate(labels):
            if group == "bank" and slot < frames.shape[2]:
                blocked[:, :, :, i] = (frames[:, :, slot] == -1)[:, :, None]
    for ab in state.ablations:
        if not ab.active(chunk):
            continue
        cols = [i for i, (group, _, _) in enumerate(labels) if group == ab.group]
        if cols:
            blocked[:, :, :, cols] |= ab.heads[:, None, :, None]
    return blocked if bool(blocked.any()) else None


def layer_mask(blocked: torch.Tensor, tokens_per_frame: int, dtype, device) -> LayerMask:
    """The attention form of one layer's blocked [B, H, n] (see `LayerMask`)."""
    n = blocked.shape[-1]
    everywhere = blocked.flatten(0, 1).all(dim=0)  # [n]
    kept = [i for i in range(n) if not bool(everywhere[i])]
    keep = None
    if len(kept) < n:
        T = tokens_per_frame
        keep = torch.cat([torch.arange(i * T, (i + 1) * T) for i in kept]).to(device)
    rest = blocked[..., kept]
    return LayerMask(keep, bias(rest if bool(rest.any()) else None, tokens_per_frame, dtype, device))


def bias(blocked: Optional[torch.Tensor], tokens_per_frame: int, dtype, device) -> Optional[torch.Tensor]:
    """Additive attention bias [B, H, 1, n * T] (-inf where blocked), or None."""
    if blocked is None:
        return None
    b = torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, float("-inf"))
    return b.repeat_interleave(tokens_per_frame, dim=-1)[:, :, None].to(device)


def ablation(group: str, num_layers: int, num_heads: int, layers, heads, first_chunk: int,
             chunks: Optional[int]) -> Ablation:
    """An Ablation of `group` for `layers` x `heads` (None: all), from `first_chunk` for `chunks` chunks
    (None: for good). Raises ValueError naming the bad argument."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r} must be one of {GROUPS}")
    rows = check_indices("layers", layers, num_layers)
    cols = check_indices("heads", heads, num_heads)
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"chunks={chunks!r} must be a positive int (or None: for good)")
    mask = torch.zeros(num_layers, num_heads, dtype=torch.bool)
    mask[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = True
    return Ablation(group, mask, first_chunk, None if chunks is None else first_chunk + chunks)


def check_indices(name: str, values, size: int) -> list[int]:
    """values (an int, a sequence of ints, or None for all) as a sorted list inside [0, size)."""
    if values is None:
        return list(range(size))
    items = [values] if isinstance(values, int) else list(values)
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size]
    if bad or not items:
        raise ValueError(f"{name}={values!r}: give indices in [0, {size}) (the model has {size} {name})")
    return sorted(set(items))

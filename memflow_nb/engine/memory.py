"""The memory bank: its record (`Bank`), the Narrative Adaptive Memory (NAM) refresh and Sparse
Memory Activation (SMA).

Bank slots are per-frame key/value tensors shaped [L, 2, B, T, H, D] (all layers stacked; T tokens
of one latent frame). Each layer and batch item selects its own frames, so slot j of layer l may
hold a different source frame than slot j of layer l+1; `frames` [L, B, n] records which.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch


EMPTY = -1  # frame of an empty slot; outside pictures have frames <= -2 (see OutsideFrame)


def is_outside(frame: int) -> bool:
    """Whether a slot's frame is an outside picture (put there by `interventions.inject_*`)."""
    return frame <= -2


@dataclass(frozen=True)
class OutsideFrame:
    """A picture from outside the stream, held as a memory frame: its slot frame is `code` (<= -2);
    its keys sit at RoPE position `position` (a latent frame index, like a stream frame's)."""

    code: int
    position: int
    label: str


@dataclass(frozen=True)
class MemoryEvent:
    """One change of the bank, kept in the state's log so people can see what happened and why.

    frames_before / frames_after: [L, B, n] source latent frame per slot (-1: empty slot, <= -2:
    an outside picture, labelled in `outside`).
    scores: [L, B, n_before] the NAM score of each slot before a compression (None otherwise).
    """

    chunk: int
    # NAM: "insert" (bank not full yet) or "compress" (keep the best, append the newest);
    # interventions: "evict", "replace", "inject".
    kind: str
    new_frame: int
    frames_before: torch.Tensor
    frames_after: torch.Tensor
    scores: Optional[torch.Tensor]
    text_zeroed: bool  # the official quirk: scored against all-zero text keys right after a switch
    outside: tuple[tuple[int, str], ...] = ()  # (frame code, label) of the outside pictures in frames_after


@dataclass(frozen=True, eq=False)
class Bank:
    """A stream's memory bank. Immutable; every tensor is read-only (states share them).

    Shapes: L layers, B batch, T tokens per latent frame, H heads, D head dim, C latent channels.
    """

    slots: tuple[torch.Tensor, ...]  # kv [L, 2, B, T, H, D] per slot
    frames: torch.Tensor  # [L, B, n_slots] long: source latent frame of each slot (-1: never filled)
    scores: torch.Tensor  # [L, B, n_slots] float32: last NAM score (nan: not scored yet)
    pending: Optional[torch.Tensor] = None  # newest record [L, 2, B, T, H, D], enters at the next refresh
    pending_frame: int = -1  # -1 if none
    n_records: int = 0  # records made so far (the official bank pointer)
    records: tuple[tuple[int, torch.Tensor], ...] = ()  # clean latents [B, C, h, w] of frames in bank/pending
    pins: frozenset = frozenset()  # (layer, frame) pairs NAM never drops from that layer's bank
    outside: tuple[OutsideFrame, ...] = ()  # every outside picture put in the bank so far

    @classmethod
    def empty(cls, num_layers: int, batch: int) -> "Bank":
        return cls((), torch.zeros(num_layers, batch, 0, dtype=torch.long), torch.zeros(num_layers, batch, 0))

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the bank holds (for byte counts)."""
        pending = [self.pending] if self.pending is not None else []
        return [self.frames, self.scores, *self.slots, *pending, *(x for _, x in self.records)]

    def positions(self) -> torch.Tensor:
        """[L, B, n_slots] the latent frame index each slot's keys were rotated for (outside
        pictures: their chosen position; empty slots: -1)."""
        pos = self.frames.clone()
        for o in self.outside:
            pos[pos == o.code] = o.position
        return pos

    def pinned(self) -> torch.Tensor:
        """[L, B, n_slots] bool: the first slot holding each pinned frame of each layer."""
        L, B, n = self.frames.shape
        out = torch.zeros(L, B, n, dtype=torch.bool)
        for l, f in self.pins:
            hit = (self.frames[l] == f)  # [B, n]
            first = hit & (hit.cumsum(dim=1) == 1)
            out[l] |= first
        return out

    def labels(self) -> tuple[tuple[int, str], ...]:
        """(code, label) of the outside pictures now in a slot."""
        held = set(self.frames.unique().tolist())
        return tuple((o.code, o.label) for o in self.outside if o.code in held)

    def pruned(self) -> "Bank":
        """The bank without the clean latents of frames no longer in a slot or pending."""
        return dataclasses.replace(self, records=_live_records(self.records, self.frames, self.pending_frame))

    def with_record(self, frame: int, kv: torch.Tensor, latent: torch.Tensor, n_records: int) -> "Bank":
        """The bank with frame `frame` (keys/values kv, clean latent [B, C, h, w]) as the pending record."""
        records = _live_records(self.records + ((frame, latent),), self.frames, frame)
        return dataclasses.replace(self, pending=kv, pending_frame=frame, n_records=n_records, records=records)


def refresh(bank: Bank, text_k: torch.Tensor, *, bank_size: int, chunk: int,
            text_zeroed: bool) -> tuple[Bank, Optional[MemoryEvent]]:
    """The NAM bank refresh before chunk `chunk`: (new bank, what happened), or (bank, None) when
    there is nothing to do.

    While the bank has free slots the pending record is put in slot n_records - 1. Once it is
    full, each layer scores its slots against the text keys text_k [L, B, Ltxt, H, D] (zeros when
    `text_zeroed`), keeps the bank_size - 1 best (best first) and appends the pending record.
    """
    n = bank.n_records
    if bank_size == 0 or n == 0 or bank.pending is None:
        return bank, None
    L, B, _ = bank.frames.shape
    pend_frames = torch.full((L, B, 1), bank.pending_frame, dtype=torch.long)
    before = bank.frames
    if n <= bank_size:
        slots, frames, scores = list(bank.slots), before.clone(), bank.scores.clone()
        while len(slots) < n - 1:  # never-filled slots read as zeros in the reference
            slots.append(torch.zeros_like(bank.pending))
            frames = torch.cat([frames, torch.full((L, B, 1), -1, dtype=torch.long)], 2)
            scores = torch.cat([scores, torch.full((L, B, 1), math.nan)], 2)
        if len(slots) >= n:
            # A pinned frame in that slot stays (in its layers); elsewhere the record takes it.
            keep = bank.pinned()[:, :, n - 1]  # [L, B]
            slots[n - 1] = torch.where(keep.to(bank.pending.device)[:, None, :, None, None, None],
                                       slots[n - 1], bank.pending) if keep.any() else bank.pending
            frames[:, :, n - 1] = torch.where(keep, frames[:, :, n - 1], bank.pending_frame)
            scores[:, :, n - 1] = torch.where(keep, scores[:, :, n - 1], math.nan)
        else:
            slots.append(bank.pending)
            frames = torch.cat([frames, pend_frames], 2)
            scores = torch.cat([scores, torch.full((L, B, 1), math.nan)], 2)
        slots, kind, all_scores = tuple(slots), "insert", None
    else:
        all_scores = nam_scores(torch.zeros_like(text_k) if text_zeroed else text_k, bank.slots).cpu()
        kept, kept_frames, kept_scores = compress(bank.slots, before, all_scores, bank_size - 1, bank.pinned())
        slots = kept + (bank.pending,)
        frames = torch.cat([kept_frames, pend_frames], 2)
        scores = torch.cat([kept_scores, torch.full((L, B, 1), math.nan)], 2)
        kind = "compress"
    records = _live_records(bank.records, frames, bank.pending_frame)
    new = dataclasses.replace(bank, slots=slots, frames=frames, scores=scores, records=records)
    event = MemoryEvent(chunk=chunk, kind=kind, new_frame=bank.pending_frame, frames_before=before,
                        frames_after=frames, scores=all_scores, text_zeroed=kind == "compress" and text_zeroed,
                        outside=new.labels())
    return new, event


def _live_records(records, frames: torch.Tensor, pending_frame: int):
    live = set(frames.unique().tolist()) | {pending_frame}
    return tuple((f, x) for f, x in records if f in live)


def nam_scores(text_k: torch.Tensor, slots: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Retrieval score of each bank slot against a prompt's text keys.

    The official score is mean over text tokens, heads and frame tokens of q_text . k / sqrt(D)
    (no softmax). Everything before the mean is linear, so it equals the dot product of the mean
    text key with the mean frame key, averaged over heads; that is what we compute (float32).

    Args:
        text_k: cross-attention keys [L, B, Ltxt, H, D].
        slots: n tensors [L, 2, B, T, H, D].
    Returns:
        scores [L, B, n] float32.
    """
    D = text_k.shape[-1]
    qm = text_k.float().mean(dim=2)  # [L, B, H, D]
    km = torch.stack([s[:, 0].float().mean(dim=2) for s in slots], dim=2)  # [L, B, n, H, D]
    return torch.einsum("lbhd,lbnhd->lbn", qm, km) / (qm.shape[2] * math.sqrt(D))


def compress(slots: tuple[torch.Tensor, ...], frames: torch.Tensor, scores: torch.Tensor, keep: int,
             pinned: Optional[torch.Tensor] = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Keep the `keep` best slots per layer and batch item, best first (official order); pinned
    slots first of all.

    Args:
        slots: n tensors [L, 2, B, T, H, D]; frames: [L, B, n] long; scores: [L, B, n];
        pinned: [L, B, n] bool, slots kept whatever their score.
    Returns:
        (kept slots (keep tensors), kept frames [L, B, keep], kept scores [L, B, keep]).
    """
    L, B, n = scores.shape
    if keep <= 0:
        return (), frames[:, :, :0], scores[:, :, :0]
    rank = scores if pinned is None or not pinned.any() else scores.masked_fill(pinned, math.inf)
    # torch.topk per layer on a [B, n] tensor, as the official loop does, so ties (all-zero text
    # keys after a switch) resolve exactly like the reference.
    idx = torch.stack([torch.topk(rank[l], k=min(keep, n), dim=1).indices for l in range(L)])  # [L, B, keep]
    stacked = torch.stack(slots, dim=0)  # [n, L, 2, B, T, H, D]
    idx_dev = idx.to(stacked.device)
    kept = []
    for j in range(idx.shape[-1]):
        sel = idx_dev[:, :, j]  # [L, B]
        g = sel[None, :, None, :, None, None, None].expand(1, L, 2, B, *stacked.shape[4:])
        kept.append(torch.gather(stacked, 0, g)[0])
    return tuple(kept), torch.gather(frames, 2, idx.to(frames.device)), torch.gather(scores, 2, idx)


def sma_select(q: torch.Tensor, k_global: torch.Tensor, v_global: torch.Tensor, tokens_per_frame: int,
               top_k: int, blocked: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse Memory Activation: keep, per head, the top-k frames of [sink | bank].

    Relevance is the dot product (no scaling) of the mean query of the whole pass with the mean key
    of each frame; the kept frames are put back in ascending frame order, as officially. Frames
    masked for a head (blocked) come last in its ranking.

    Args:
        q: rotated queries [B, Lq, H, D]; k_global / v_global: [B, n * T, H, D]; blocked: [B, H, n] bool.
    Returns:
        (k [B, H, k' * T, D], v [B, H, k' * T, D], kept frame positions [B, H, k']).
    """
    B, Lg, H, D = k_global.shape
    n = Lg // tokens_per_frame
    phi_q = q.mean(dim=1)  # [B, H, D]
    kf = k_global.view(B, n, tokens_per_frame, H, D)
    phi_k = kf.mean(dim=2)  # [B, n, H, D]
    rel = torch.einsum("bhd,bnhd->bhn", phi_q, phi_k)
    if blocked is not None:
        rel = rel.masked_fill(blocked.to(rel.device), float("-inf"))
    kk = min(top_k, n)
    idx = torch.topk(rel, k=kk, dim=-1).indices.sort(dim=-1).values  # [B, H, kk]
    g = idx[..., None, None].expand(B, H, kk, tokens_per_frame, D)
    k_sel = torch.gather(kf.permute(0, 3, 1, 2, 4), 2, g).reshape(B, H, kk * tokens_per_frame, D)
    vf = v_global.view(B, n, tokens_per_frame, H, D).permute(0, 3, 1, 2, 4)
    v_sel = torch.gather(vf, 2, g).reshape(B, H, kk * tokens_per_frame, D)
    return k_sel, v_sel, idx

"""The memory bank: Narrative Adaptive Memory (NAM) refresh and Sparse Memory Activation (SMA).

Bank slots are per-frame key/value tensors shaped [L, 2, B, T, H, D] (all layers stacked; T tokens
of one latent frame). Each layer and batch item selects its own frames, so slot j of layer l may
hold a different source frame than slot j of layer l+1; `frames` [L, B, n] records which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class MemoryEvent:
    """One bank refresh, kept in the state's log so people can see what NAM did and why.

    frames_before / frames_after: [L, B, n] source latent frame per slot (-1: empty slot).
    scores: [L, B, n_before] the NAM score of each slot before a compression (None for inserts).
    """

    chunk: int
    kind: str  # "insert" (bank not full yet) or "compress" (keep the best, append the newest)
    new_frame: int
    frames_before: torch.Tensor
    frames_after: torch.Tensor
    scores: Optional[torch.Tensor]
    text_zeroed: bool  # the official quirk: scored against all-zero text keys right after a switch


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


def compress(slots: tuple[torch.Tensor, ...], frames: torch.Tensor, scores: torch.Tensor,
             keep: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Keep the `keep` best slots per layer and batch item, best first (official order).

    Args:
        slots: n tensors [L, 2, B, T, H, D]; frames: [L, B, n] long; scores: [L, B, n].
    Returns:
        (kept slots (keep tensors), kept frames [L, B, keep], kept scores [L, B, keep]).
    """
    L, B, n = scores.shape
    if keep <= 0:
        return (), frames[:, :, :0], scores[:, :, :0]
    # torch.topk per layer on a [B, n] tensor, as the official loop does, so ties (all-zero text
    # keys after a switch) resolve exactly like the reference.
    idx = torch.stack([torch.topk(scores[l], k=min(keep, n), dim=1).indices for l in range(L)])  # [L, B, keep]
    stacked = torch.stack(slots, dim=0)  # [n, L, 2, B, T, H, D]
    idx_dev = idx.to(stacked.device)
    kept = []
    for j in range(idx.shape[-1]):
        sel = idx_dev[:, :, j]  # [L, B]
        g = sel[None, :, None, :, None, None, None].expand(1, L, 2, B, *stacked.shape[4:])
        kept.append(torch.gather(stacked, 0, g)[0])
    return tuple(kept), torch.gather(frames, 2, idx.to(frames.device)), torch.gather(scores, 2, idx)


def sma_select(q: torch.Tensor, k_global: torch.Tensor, v_global: torch.Tensor, tokens_per_frame: int,
               top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse Memory Activation: keep, per head, the top-k frames of [sink | bank].

    Relevance is the dot product (no scaling) of the mean query of the whole pass with the mean key
    of each frame; the kept frames are put back in ascending frame order, as officially.

    Args:
        q: rotated queries [B, Lq, H, D]; k_global / v_global: [B, n * T, H, D].
    Returns:
        (k [B, H, k' * T, D], v [B, H, k' * T, D], kept frame positions [B, H, k']).
    """
    B, Lg, H, D = k_global.shape
    n = Lg // tokens_per_frame
    phi_q = q.mean(dim=1)  # [B, H, D]
    kf = k_global.view(B, n, tokens_per_frame, H, D)
    phi_k = kf.mean(dim=2)  # [B, n, H, D]
    rel = torch.einsum("bhd,bnhd->bhn", phi_q, phi_k)
    kk = min(top_k, n)
    idx = torch.topk(rel, k=kk, dim=-1).indices.sort(dim=-1).values  # [B, H, kk]
    g = idx[..., None, None].expand(B, H, kk, tokens_per_frame, D)
    k_sel = torch.gather(kf.permute(0, 3, 1, 2, 4), 2, g).reshape(B, H, kk * tokens_per_frame, D)
    vf = v_global.view(B, n, tokens_per_frame, H, D).permute(0, 3, 1, 2, 4)
    v_sel = torch.gather(vf, 2, g).reshape(B, H, kk * tokens_per_frame, D)
    return k_sel, v_sel, idx

"""Looking inside: where attention goes, and what the memory bank holds.

`record_attention(model)` is a context manager. While it is open, each self-attention of that
model, stepped in this thread, reports its queries and keys; we recompute the softmax in blocks of
queries (under a byte budget) and keep only a pooled summary: for each layer, head and query
frame, the attention mass on each key frame, labelled sink / bank slot / local / current.
Cross-attention mass per text token is pooled the same way, and every memory-bank refresh (NAM
scores) is logged. The engine's outputs are untouched: recording only reads q and k. Other models,
and other threads stepping the same model, are never recorded. An `AttentionRecording` is an
observer (memflow_nb.engine.observers), so it can also be passed to one call:
`step(model, state, observers=[rec])`.

Bank views work on a State: its memory log says which frame sits in which slot, since when, with
which retrieval scores; its kept clean latents can be decoded to thumbnails.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .engine.masks import bias as key_bias
from .engine.memory import MemoryEvent
from .engine.observers import ObserverBindings, PassInfo

MiB = 1 << 20


@dataclass(frozen=True)
class SelfAttentionSummary:
    """Pooled self-attention of one layer in one pass.

    mass [B, H, n_query_frames, n_key_frames]: mean over the query tokens of a frame of the
    attention probability summed over the key tokens of a key frame (each row sums to 1).
    key_frames: per key column (group, frame, slot): group is "sink", "bank", "local" (cached
    earlier frames) or "current" (frames of this pass); slot is the bank slot (bank only); the
    frame of a bank slot is this layer's source frame of that slot (batch item 0).
    """

    chunk: int
    kind: str  # "denoise", "clean" or "recache"
    step: int
    layer: int
    query_frames: tuple[int, ...]
    key_frames: tuple[tuple[str, int, int], ...]
    mass: torch.Tensor

    def group_mass(self) -> dict[str, torch.Tensor]:
        """Mass per group {sink, bank, local, current}: [B, H, n_query_frames]."""
        out = {}
        for g in ("sink", "bank", "local", "current"):
            cols = [i for i, (grp, _, _) in enumerate(self.key_frames) if grp == g]
            out[g] = self.mass[..., cols].sum(-1) if cols else self.mass.new_zeros(self.mass.shape[:-1])
        return out


@dataclass(frozen=True)
class CrossAttentionSummary:
    """Pooled cross-attention of one layer in one pass: mass [B, H, n_query_frames, text_len]."""

    chunk: int
    kind: str
    step: int
    layer: int
    query_frames: tuple[int, ...]
    mass: torch.Tensor


class AttentionRecording:
    """What a `record_attention` context collected (see the module docstring)."""

    def __init__(self, layers, kinds, steps, cross, block_bytes, max_bytes):
        self.layers = None if layers is None else frozenset(int(l) for l in layers)
        self.kinds = frozenset(kinds)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.cross = cross
        self.block_bytes, self.max_bytes = int(block_bytes), int(max_bytes)
        self.self_attention_summaries: list[SelfAttentionSummary] = []
        self.cross_attention_summaries: list[CrossAttentionSummary] = []
        self.memory_events: list[MemoryEvent] = []
        self.truncated = False  # True once the byte budget stopped the recording
        self.peak_block_bytes = 0  # largest transient block the recomputation used
        self._nbytes = 0

    # -- what users read ---------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the kept summaries (never above max_bytes)."""
        return self._nbytes

    def select(self, *, chunk=None, kind=None, step=None, layer=None) -> list[SelfAttentionSummary]:
        """Self-attention summaries matching every given field."""
        return [s for s in self.self_attention_summaries
                if (chunk is None or s.chunk == chunk) and (kind is None or s.kind == kind)
                and (step is None or s.step == step) and (layer is None or s.layer == layer)]

    def layer_by_key_frame(self, chunk: int, step: int = -1, kind: str = "denoise") -> tuple[torch.Tensor, tuple]:
        """Mass per layer, head and key frame, averaged over query frames (batch item 0).

        step=-1 means the last denoising step recorded for that chunk.
        Returns (mass [L_recorded, H, n_key_frames], key_frames labels of the last layer).
        """
        rows = self.select(chunk=chunk, kind=kind)
        if not rows:
            raise KeyError(f"nothing recorded for chunk {chunk} ({kind})")
        step = max(r.step for r in rows) if step == -1 else step
        rows = sorted((r for r in rows if r.step == step), key=lambda r: r.layer)
        return torch.stack([r.mass[0].mean(dim=1) for r in rows]), rows[-1].key_frames

    # -- engine callbacks ----------------------------------------------------------------------
    def _wanted(self, info, layer) -> bool:
        return (not self.truncated and info.kind in self.kinds and (self.layers is None or layer in self.layers)
                and (self.steps is None or info.kind != "denoise" or info.step in self.steps))

    def _keep(self, nbytes: int) -> bool:
        if self._nbytes + nbytes > self.max_bytes:
            if not self.truncated:
                warnings.warn(f"attention recording reached its budget of {self.max_bytes / MiB:.1f} MiB; "
                              "later passes are not recorded (raise max_bytes or record fewer layers/steps)")
            self.truncated = True
            return False
        self._nbytes += nbytes
        return True

    def self_attention(self, info: PassInfo, layer: int, q: torch.Tensor, k: torch.Tensor,
                       sma_frames=None) -> None:
        """q [B, Lq, H, D]; k [B, H, Lk, D] as attended (with SMA: the selected global frames first)."""
        if not self._wanted(info, layer):
            return
        T = info.tokens_per_frame
        labels = list(info.key_frames)
        bank_frames = info.bank_frames
        for i, (g, f, slot) in enumerate(labels):
            if g == "bank":
                labels[i] = (g, int(bank_frames[layer, 0, slot]), slot)
        n_keys = len(labels)
        blocked = None if info.blocked is None else info.blocked[layer]  # [B, H, n_keys]: masked frames
        if blocked is not None and sma_frames is not None:  # in the columns as attended
            n_glob = sum(1 for g, _, _ in labels if g in ("sink", "bank"))
            glob = torch.gather(blocked[..., :n_glob], -1, sma_frames.cpu())
            blocked = torch.cat([glob, blocked[..., n_glob:]], dim=-1)
        pooled = self._pooled(q, k, T, k.shape[2] // T, blocked=blocked)  # [B, H, nq, n_kcols]
        if sma_frames is not None:
            # Each head saw only its selected global frames; scatter them back to the full key axis.
            n_glob = sum(1 for g, _, _ in labels if g in ("sink", "bank"))
            kk = sma_frames.shape[-1]
            full = pooled.new_zeros(*pooled.shape[:3], n_keys)
            idx = sma_frames.to(pooled.device)[:, :, None, :].expand(*pooled.shape[:3], kk)
            full[..., :n_glob] = full[..., :n_glob].scatter(-1, idx, pooled[..., :kk])
            full[..., n_glob:] = pooled[..., kk:]
            pooled = full
        mass = pooled.cpu()
        if self._keep(mass.numel() * mass.element_size()):
            p0, p1 = info.frames
            self.self_attention_summaries.append(SelfAttentionSummary(
                info.chunk, info.kind, info.step, layer, tuple(range(p0, p1)), tuple(labels), mass))

    def cross_attention(self, info: PassInfo, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """q [B, Lq, H, D]; k text keys [B, Ltxt, H, D]."""
        if not self.cross or not self._wanted(info, layer):
            return
        pooled = self._pooled(q, k.transpose(1, 2), info.tokens_per_frame, k.shape[1], key_group=1).cpu()
        if self._keep(pooled.numel() * pooled.element_size()):
            p0, p1 = info.frames
            self.cross_attention_summaries.append(CrossAttentionSummary(
                info.chunk, info.kind, info.step, layer, tuple(range(p0, p1)), pooled))

    def memory_event(self, event: MemoryEvent) -> None:
        self.memory_events.append(event)

    def _pooled(self, q, k, T: int, n_cols: int, key_group: Optional[int] = None,
                blocked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Softmax(q k^T / sqrt(D)) pooled to [B, H, nq_frames, n_cols], in query blocks.

        Keys are grouped in runs of `key_group` tokens (default T: one column per latent frame);
        key frames blocked [B, H, n_cols] get no attention (the engine's masks).
        """
        B, Lq, H, D = q.shape
        Lk = k.shape[2]
        key_group = T if key_group is None else key_group
        scale = 1.0 / math.sqrt(D)
        # Transient per query token: logits and probabilities (fp32) for every head and key.
        per_query = 2 * H * Lk * 4
        if per_query > self.block_bytes:
            raise ValueError(f"block_bytes={self.block_bytes} is below one query row ({per_query} bytes for "
                             f"{H} heads x {Lk} keys); raise block_bytes")
        rows = min(Lq, self.block_bytes // per_query)
        self.peak_block_bytes = max(self.peak_block_bytes, rows * per_query)
        kf = k.float()
        bias = 0.0 if blocked is None else key_bias(blocked, key_group, torch.float32, q.device)
        out = torch.zeros(B, H, Lq // T, n_cols, device=q.device)
        for a in range(0, Lq, rows):
            qb = q[:, a:a + rows].float().transpose(1, 2)  # [B, H, r, D]
            p = torch.softmax(qb @ kf.transpose(-1, -2) * scale + bias, dim=-1)  # [B, H, r, Lk]
            p = p.view(B, H, p.shape[2], n_cols, key_group).sum(-1)  # [B, H, r, n_cols]
            frame = torch.arange(a, a + p.shape[2], device=q.device) // T
            out.index_add_(2, frame, p)
        return out / T


@contextmanager
def record_attention(model, *, layers: Optional[Sequence[int]] = None, kinds: Sequence[str] = ("denoise",),
                     steps: Optional[Sequence[int]] = None, cross: bool = True,
                     block_bytes: int = 64 * MiB, max_bytes: int = 256 * MiB) -> Iterator[AttentionRecording]:
    """Record pooled attention of `model` while the block runs (only this thread's steps of it).

    Args:
        model: the CausalWanModel (or its fast wrapper) whose passes to record; a wrapper and the
            model it wraps share their recordings.
        layers: layer indices to record (default all).
        kinds: pass kinds: "denoise" (the denoising steps), "clean" (cache-writing pass), "recache".
        steps: denoising step indices to record (default all).
        cross: also pool cross-attention mass per text token.
        block_bytes: transient memory for recomputing probabilities, per block of queries.
        max_bytes: cap on the kept summaries; past it recording stops with a warning (`truncated`).

    Example:
        with record_attention(model, layers=[0, 29]) as rec:
            state, x0 = step(model, state)
        mass, labels = rec.layer_by_key_frame(chunk=state.chunk_index - 1)
    """
    bad = set(kinds) - {"denoise", "clean", "recache"}
    if bad:
        raise ValueError(f"unknown pass kinds {sorted(bad)}; use denoise, clean, recache")
    if block_bytes <= 0 or max_bytes <= 0:
        raise ValueError("block_bytes and max_bytes must be positive")
    bindings = getattr(model, "observers", None)
    if not isinstance(bindings, ObserverBindings):
        raise TypeError(f"record_attention(model, ...) takes the CausalWanModel to record (e.g. pipe.model), "
                        f"got {type(model).__name__}")
    n = model.cfg.num_layers
    if layers is not None and any(isinstance(l, bool) or not 0 <= int(l) < n for l in layers):
        raise ValueError(f"layers={list(layers)}: this model has {n} layers, numbered 0 to {n - 1}")
    rec = AttentionRecording(layers, kinds, steps, cross, block_bytes, max_bytes)
    with bindings.bound(rec):
        yield rec


# -- memory-bank views --------------------------------------------------------------------------

@dataclass(frozen=True)
class BankStay:
    """One stay of a source frame in one layer's bank."""

    layer: int
    frame: int  # latent frame; <= -2 for an outside picture (see `outside`)
    entered: int  # chunk whose refresh (or intervention) put it in
    left: Optional[int]  # chunk whose refresh (or intervention) dropped it (None: still there)
    scores: tuple[tuple[int, float], ...]  # (chunk, NAM score) at every compression it took part in
    outside: Optional[str] = None  # the label of an outside picture (memflow_nb.interventions.inject_image)


def bank_slots(state) -> list[dict]:
    """The bank now: one row per layer and slot {layer, slot, frame, score, pinned, outside}
    (batch item 0). frame -1 is an empty slot; an outside picture has frame <= -2 and its label in
    `outside` (None for stream frames); `pinned`: NAM never drops it (memflow_nb.interventions.pin)."""
    frames, scores = state.bank_frames, state.bank_scores
    labels = {o.code: o.label for o in state.memory.outside}
    pinned = state.memory.pinned()
    return [{"layer": l, "slot": j, "frame": int(frames[l, 0, j]), "score": float(scores[l, 0, j]),
             "pinned": bool(pinned[l, 0, j]), "outside": labels.get(int(frames[l, 0, j]))}
            for l in range(frames.shape[0]) for j in range(frames.shape[2])]


def bank_history(events: Sequence[MemoryEvent], batch: int = 0) -> list[BankStay]:
    """Stays of frames in each layer's bank, from a memory log (`state.memory_log`); outside
    pictures carry their label. Empty slots (frame -1) are not stays."""
    stays: dict[tuple[int, int], dict] = {}
    done: list[BankStay] = []
    labels: dict[int, str] = {}
    for ev in events:
        labels.update(ev.outside)
        L = ev.frames_after.shape[0]
        for l in range(L):
            before = ev.frames_before[l, batch].tolist()
            after = set(ev.frames_after[l, batch].tolist()) - {-1}
            if ev.scores is not None:
                for j, f in enumerate(before):
                    if (l, f) in stays:
                        stays[(l, f)]["scores"].append((ev.chunk, float(ev.scores[l, batch, j])))
            for f in after - set(k[1] for k in stays if k[0] == l):
                stays[(l, f)] = {"entered": ev.chunk, "scores": []}
            for key in [k for k in stays if k[0] == l and k[1] not in after]:
                s = stays.pop(key)
                done.append(BankStay(l, key[1], s["entered"], ev.chunk, tuple(s["scores"]), labels.get(key[1])))
    done += [BankStay(l, f, s["entered"], None, tuple(s["scores"]), labels.get(f)) for (l, f), s in stays.items()]
    return sorted(done, key=lambda s: (s.layer, s.entered, s.frame))


def bank_timeline(events: Sequence[MemoryEvent], num_layers: int, slots: int, batch: int = 0) -> np.ndarray:
    """Frame per (refresh, layer, slot) as an int array [n_events, L, slots] (-1 = empty)."""
    out = np.full((len(events), num_layers, slots), -1, dtype=np.int64)
    for i, ev in enumerate(events):
        fa = ev.frames_after[:, batch].numpy()
        out[i, :, :fa.shape[1]] = fa
    return out


@torch.no_grad()
def bank_thumbnails(vae, state) -> dict[int, np.ndarray]:
    """uint8 [H, W, 3] images of the frames in the bank (and the pending record), decoded from the
    clean latents the state keeps. Each is decoded on its own, as the first frame of a clip."""
    from .decode import decode_chunk, init_decode_state, to_uint8

    p = next(vae.parameters())
    out = {}
    for frame, lat in state.records:
        pixels, _ = decode_chunk(vae, lat[:1, None].to(p.device, p.dtype), init_decode_state(vae))
        out[frame] = to_uint8(pixels[0])[0]
    return out

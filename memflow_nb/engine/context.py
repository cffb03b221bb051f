"""The self-attention context of a chunk: which key frames a pass sees, kept in one workspace.

A pass over frames [p0, p1) attends to
    [sink frames 0..sink-1 | visible bank slots | local frames max(sink, p1-(local-sink)) .. p1-1]
where a frame comes from this pass if the pass covers it (sink frames only when the pass is not
a re-cache of already cached frames), otherwise from the cache, and unwritten sink frames are
zeros (or left out: `StreamConfig.empty_frames`, see `layout`). Key frames an ablation masks, or
empty bank slots a stream skips, are masked per layer and head (masks.py); data is never deleted.

A `Workspace` holds those key frames for all layers in one buffer [L, 2, B, n_frames * T, H, D]:
the cached and zero frames are written once per chunk, and each pass writes only its own frames'
keys/values before attending. A chunk's denoising passes and its clean pass share one workspace
(same frames, same bank). A workspace read by a single pass (the re-cache of a prompt switch)
keeps one layer at a time instead (`one_pass`): each layer is read once, so the copies are the
same and the buffer is L times smaller. `memflow_nb.fast.graphs` replays passes over a
workspace whose buffer it owns. The tests keep the slower path that concatenates the pieces on
every pass as an oracle.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import masks
from . import memory as mem
from .model import Attention, sdpa
from .observers import Observer, PassInfo
from .state import State

# One key frame: ("cache", kv [L, 2, B, T, H, D]) | ("cur", frame offset in the pass) | ("zero", None).
Piece = tuple[str, object]


def layout(state: State, p0: int, p1: int, recompute: bool) -> tuple[list[Piece], list[Piece], list[Piece], tuple]:
    """Key frames of a pass over frames [p0, p1): (sink, bank, local) pieces, one per frame, and
    their labels (group, frame, slot) in key order (group sink / bank / local / current).

    Frames nothing was written to yet are zero pieces, or left out when the stream skips them.
    """
    sc = state.stream
    cached = dict(state.cache)

    def frame(f, allow_cur):
        if allow_cur and p0 <= f < p1:
            return ("cur", f - p0)
        if f in cached:
            return ("cache", cached[f])
        return ("zero", None)

    sink = [(frame(f, not recompute), ("sink", f, -1)) for f in range(sc.sink_size)]
    lo = max(sc.sink_size, p1 - (sc.local_attn_size - sc.sink_size))
    local = [(frame(f, True), ("current" if p0 <= f < p1 else "local", f, -1)) for f in range(lo, p1)]
    bank = []
    if sc.sink_size > 0 and sc.bank_size > 0:  # the official sink-less path never reads the bank
        # Officially the slots recorded so far; slots put there by an intervention are seen too.
        visible = max(min(state.n_records, sc.bank_size), len(state.bank))
        bank = [(("cache", state.bank[j]) if j < len(state.bank) else ("zero", None), ("bank", -1, j))
                for j in range(visible)]
    if sc.empty_frames == "skip":
        sink, bank, local = ([p for p in part if p[0][0] != "zero"] for part in (sink, bank, local))
    labels = tuple(label for part in (sink, bank, local) for _, label in part)
    return [p for p, _ in sink], [p for p, _ in bank], [p for p, _ in local], labels


class Workspace:
    """The key frames of the passes over frames [p0, p1) of one chunk, and the buffer that holds them.

    Attributes: `rope_start` (RoPE position of frame p0), `n_frames` key frames of `T` tokens,
    `runs` ((workspace frame, pass frame, count), ...) where each pass writes its own keys,
    `n_glob` leading frames (sink and bank) that SMA chooses from when `sma`.
    """

    def __init__(self, state: State, p0: int, p1: int, recompute: bool, *, one_pass: bool = False):
        self.state, self.p0, self.p1 = state, p0, p1
        self.one_pass = one_pass
        self.rope_start = p0 - state.pos_offset
        self.T = state.tokens_per_frame
        self.sink, self.bank, self.local, self.key_labels = layout(state, p0, p1, recompute)
        pieces = self.sink + self.bank + self.local
        self.n_frames = len(pieces)
        self.n_glob = len(self.sink) + len(self.bank)
        self.sma = state.stream.sma and state.stream.sink_size > 0 and self.n_glob > 0
        # [L, B, H, n_frames] key frames masked out (ablations, skipped empty slots), or None.
        self.blocked = masks.key_mask(state, self.key_labels, state.chunk_index, state.model_config.num_heads)
        self._layer_masks: dict[int, masks.LayerMask] = {}
        self.fixed = tuple((i, val) for i, (kind, val) in enumerate(pieces) if kind != "cur")
        self.runs = copy_runs((i, j) for i, (kind, j) in enumerate(pieces) if kind == "cur")
        self.buffer: Optional[torch.Tensor] = None

    def labels(self) -> tuple:
        """Per key frame (group, frame, slot): group sink / bank / local / current (see PassInfo)."""
        return self.key_labels

    def layer_mask(self, layer: int, dtype, device) -> Optional[masks.LayerMask]:
        """This layer's mask in attention form, or None when it attends to every key frame."""
        if self.blocked is None or not bool(self.blocked[layer].any()):
            return None
        if layer not in self._layer_masks:
            self._layer_masks[layer] = masks.layer_mask(self.blocked[layer], self.T, dtype, device)
        return self._layer_masks[layer]

    def use(self, buffer: torch.Tensor) -> None:
        """Keep the key frames in `buffer` [L, 2, B, >= n_frames * T, H, D]; writes the fixed frames."""
        self._write_fixed(buffer, None)
        self.buffer = buffer

    def _write_fixed(self, buffer: torch.Tensor, layer: Optional[int]) -> None:
        """The cached and zero frames into buffer [..., 2, B, frames * T, H, D]: every layer's, or one layer's."""
        T = self.T
        for i, frame_kv in self.fixed:
            dst = buffer.narrow(-3, i * T, T)
            if frame_kv is None:
                dst.zero_()
            else:
                dst.copy_(frame_kv if layer is None else frame_kv[layer])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends=None,
               observers: Sequence[Observer] = (), info: Optional[PassInfo] = None) -> torch.Tensor:
        """Self-attention of this pass's q [B, Lq, H, D] (its keys/values k, v) over the key frames."""
        T = self.T
        if self.buffer is None:  # first use: now dtype and device are known
            B, _, H, D = k.shape
            if self.one_pass:
                self.buffer = k.new_empty(1, 2, B, self.n_frames * T, H, D)
            else:
                self.use(k.new_empty(self.state.model_config.num_layers, 2, B, self.n_frames * T, H, D))
        if self.one_pass:
            ws = self.buffer[0]
            self._write_fixed(ws, layer)
        else:
            ws = self.buffer[layer]
        for dst, src, n in self.runs:
            ws[0, :, dst * T:(dst + n) * T] = k[:, src * T:(src + n) * T]
            ws[1, :, dst * T:(dst + n) * T] = v[:, src * T:(src + n) * T]
        end = self.n_frames * T
        keys, values = ws[0, :, :end], ws[1, :, :end]
        return attend_keys(self, layer, q, keys, values, backends, observers, info)


def attend_keys(ws: Workspace, layer: int, q, keys, values, backends, observers, info) -> torch.Tensor:
    """Attention of q over all key frames keys/values [B, n_frames * T, H, D] (masks and SMA applied here)."""
    mask = ws.layer_mask(layer, q.dtype, q.device)
    if ws.sma:
        blocked = ws.blocked[layer] if mask is not None else None  # [B, H, n_frames]
        g = ws.n_glob * ws.T
        kg, vg, sel = mem.sma_select(q, keys[:, :g], values[:, :g], ws.T, ws.state.stream.sma_top_k,
                                     blocked=None if blocked is None else blocked[..., :ws.n_glob])
        kg = torch.cat([kg, keys[:, g:].transpose(1, 2)], dim=2)
        vg = torch.cat([vg, values[:, g:].transpose(1, 2)], dim=2)
        for ob in observers:
            ob.self_attention(info, layer, q, kg, sma_frames=sel)
        attended = None
        if blocked is not None:  # frames SMA had to take although masked stay masked
            glob = torch.gather(blocked[..., :ws.n_glob].to(sel.device), -1, sel)
            attended = torch.cat([glob, blocked[..., ws.n_glob:].to(sel.device)], dim=-1)
        bias = masks.bias(attended, ws.T, q.dtype, q.device)
        return sdpa(q, kg.transpose(1, 2), vg.transpose(1, 2), backends, bias)
    for ob in observers:
        ob.self_attention(info, layer, q, keys.transpose(1, 2))
    if mask is None:
        return sdpa(q, keys, values, backends)
    if mask.keep is not None:  # frames no head sees: left out, as if the context lacked them
        keys, values = keys.index_select(1, mask.keep), values.index_select(1, mask.keep)
    return sdpa(q, keys, values, backends, mask.bias)


def copy_runs(pairs) -> tuple[tuple[int, int, int], ...]:
    """(destination frame, source frame) pairs -> ((dst, src, count), ...): runs where both step by one."""
    runs: list[list[int]] = []
    for dst, src in pairs:
        if runs and runs[-1][0] + runs[-1][2] == dst and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([dst, src, 1])
    return tuple(tuple(r) for r in runs)


class PassKV:
    """Collects a pass's keys/values of the pass frames `frames` (None: all) into one tensor `kv`
    [L, 2, B, len(frames) * T, H, D], layer by layer as the pass runs: the only copy of them that
    exists. `out`, when given, is that tensor (e.g. a CUDA graph's static one)."""

    def __init__(self, num_layers: int, T: int, frames=None, out: Optional[torch.Tensor] = None):
        self.num_layers, self.T, self.kv = num_layers, T, out
        self.frames = None if frames is None else tuple(frames)
        self.runs = None if frames is None else copy_runs(enumerate(self.frames))

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, f * T, H, D]: this layer's keys/values of the whole pass."""
        T = self.T
        if self.kv is None:
            B, n, H, D = k.shape
            frames = n // T if self.frames is None else len(self.frames)
            self.kv = k.new_empty(self.num_layers, 2, B, frames * T, H, D)
        if self.runs is None:
            self.kv[layer, 0].copy_(k)
            self.kv[layer, 1].copy_(v)
            return
        for dst, src, n in self.runs:
            self.kv[layer, 0, :, dst * T:(dst + n) * T].copy_(k[:, src * T:(src + n) * T])
            self.kv[layer, 1, :, dst * T:(dst + n) * T].copy_(v[:, src * T:(src + n) * T])


class PassAttention(Attention):
    """The attention of one pass: self-attention over a workspace, cross-attention to the text.

    Observers see both; `record` (a `PassKV`), when given, keeps each layer's keys/values of this pass.
    """

    def __init__(self, workspace: Workspace, kind: str, step: int, *, observers: Sequence[Observer] = (),
                 backends=None, record: Optional[PassKV] = None):
        self.ws, self.backends, self.record = workspace, backends, record
        self.observers = tuple(observers)
        st = workspace.state
        self.info = PassInfo(st.chunk_index, kind, step, (workspace.p0, workspace.p1), workspace.labels(),
                             st.bank_frames, workspace.T, workspace.blocked) if self.observers else None

    def __call__(self, layer, q, k, v, need_output):
        if self.record is not None:
            self.record(layer, k, v)
        if not need_output:
            return None
        return self.ws.attend(layer, q, k, v, self.backends, self.observers, self.info)

    def cross(self, layer, q, k, v):
        for ob in self.observers:
            ob.cross_attention(self.info, layer, q, k)
        return super().cross(layer, q, k, v)

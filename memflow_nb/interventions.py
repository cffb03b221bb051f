"""Interventions on the memory bank: "what if the bank had held something else?"

Each function takes the model and a `State` and returns a new State; the old one is untouched and
steps to the same bits as before. Bad input raises one ValueError (or TypeError) naming the
argument, and nothing is returned half-changed.

    pin / unpin      keep a frame in a layer's bank whatever NAM scores it (per layer or all)
    evict            empty a slot now (an empty slot reads as zero keys, or is skipped with
                     StreamConfig(empty_frames="skip"))
    replace_slot     put another past frame the state still has in a slot
    inject_latents   put a picture from outside the stream in a slot: its keys/values come from a
    inject_image     clean pass over its latents alone, at a position you choose; the image form
                     encodes it first with the Wan VAE encoder (memflow_nb.decode.encoder)
    ablate           mask the bank (or the sink) per layer and head for the next chunks

Slots are per layer: `layers=None` means every layer. Outside pictures get negative frame codes
(<= -2) and labels; `bank_slots`, `bank_history` and the plots show them as outside.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from .engine import masks
from .engine import memory as mem
from .engine.checks import check_state
from .engine.model import Attention, sdpa
from .engine.state import KV, MEMORY_LOG_MAX, State


def pin(model, state: State, frame: int, *, layers: Optional[Sequence[int]] = None) -> State:
    """Keep `frame` in the bank of `layers` (default all): NAM never drops it there.

    The frame must be in a requested layer's bank now, or be the pending record (then the pin holds
    once it enters). A compression keeps bank_size - 1 frames, so at most that many may be pinned
    per layer.
    """
    check_state(model, state)
    bank, sc = state.memory, state.stream
    rows = _layers(state, layers)
    _need_bank(state)
    _check_frame(frame)
    held = [l for l in rows if frame in bank.frames[l].flatten().tolist()]
    if not held and frame != bank.pending_frame:
        raise ValueError(f"frame={frame} is neither in the bank of layers {_short(rows)} nor pending "
                         f"(pending: {bank.pending_frame}); see mf.bank_slots(state)")
    pins = bank.pins | {(l, frame) for l in rows}
    for l in rows:
        present = set(bank.frames[l].flatten().tolist()) | {bank.pending_frame}
        n = len({f for ll, f in pins if ll == l and f in present})
        if n > sc.bank_size - 1:
            raise ValueError(f"pinning frame {frame} would pin {n} frames in layer {l}, but a compression keeps "
                             f"only bank_size - 1 = {sc.bank_size - 1}; unpin one first")
    return dataclasses.replace(state, memory=dataclasses.replace(bank, pins=frozenset(pins)))


def unpin(model, state: State, frame: int, *, layers: Optional[Sequence[int]] = None) -> State:
    """Let NAM drop `frame` again in `layers` (default all)."""
    check_state(model, state)
    rows = set(_layers(state, layers))
    pins = frozenset(p for p in state.memory.pins if not (p[1] == frame and p[0] in rows))
    if pins == state.memory.pins:
        raise ValueError(f"frame={frame} is not pinned in layers {_short(sorted(rows))}")
    return dataclasses.replace(state, memory=dataclasses.replace(state.memory, pins=pins))


def evict(model, state: State, slot: int, *, layers: Optional[Sequence[int]] = None) -> State:
    """Empty bank slot `slot` in `layers` (default all) now: frame -1, zero keys and values."""
    check_state(model, state)
    rows = _layers(state, layers)
    _need_bank(state)
    n = len(state.bank)
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < n:
        raise ValueError(f"slot={slot!r} is out of range: the bank holds {n} slot(s) now (bank_size "
                         f"{state.stream.bank_size}); see mf.bank_slots(state)")
    _not_pinned(state, slot, rows)
    return _put(state, slot, None, mem.EMPTY, rows, "evict")


def replace_slot(model, state: State, slot: int, frame: int, *, layers: Optional[Sequence[int]] = None) -> State:
    """Put past frame `frame` in bank slot `slot` of `layers` (default all).

    Its keys/values are the ones the stream computed, when the state still holds them for every
    requested layer (the frame is in the cache, pending, or in a slot of each of those layers).
    Otherwise they are recomputed from its kept clean latents (frames in the bank or pending, and
    the last local_attn_size frames) by a clean pass over that frame alone at its own position:
    the context it first saw is gone.
    """
    check_state(model, state)
    rows = _layers(state, layers)
    _need_bank(state)
    _check_slot(state, slot, 1)
    _check_frame(frame)
    _not_pinned(state, slot, rows)
    return _put(state, slot, _kv_of(model, state, frame, rows), frame, rows, "replace")


def inject_latents(model, state: State, latents: torch.Tensor, *, slot: int, position: int = 0,
                   layers: Optional[Sequence[int]] = None, label: Optional[str] = None) -> State:
    """Put outside latents in the bank as memory frames.

    Args:
        latents: normalised latents [C, h, w], [F, C, h, w] or [1 or B, F, C, h, w] at the stream's latent size
            (what the generator makes, or `memflow_nb.decode.encoder.encode_video` of a picture).
        slot: the first slot to fill; latent frame i goes to slot + i.
        position: the latent frame index the picture pretends to be at (its RoPE position, re-based
            like a stream frame's); frame i sits at position + i.
        label: a name shown in every view (default "picture <k>").
    Their keys/values come from one clean pass (t = context_noise, the active prompt) over these
    frames alone, as if they began a clip at `position`.
    """
    check_state(model, state)
    rows = _layers(state, layers)
    _need_bank(state)
    lat = _check_latents(state, latents)
    F = lat.shape[1]
    _check_slot(state, slot, F)
    for j in range(slot, slot + F):
        _not_pinned(state, j, rows)
    start = _check_position(state, position, F)
    kv = clean_kv(model, state, lat, start)
    T = state.tokens_per_frame
    bank = state.memory
    label = label or f"picture {len(bank.outside)}"
    for i in range(F):
        code = -2 - len(state.memory.outside)
        name = label if F == 1 else f"{label} [{i}]"
        outside = state.memory.outside + (mem.OutsideFrame(code, position + i, name),)
        records = state.memory.records + ((code, lat[:, i]),)
        state = dataclasses.replace(state, memory=dataclasses.replace(state.memory, outside=outside, records=records))
        state = _put(state, slot + i, kv[:, :, :, i * T:(i + 1) * T].clone(), code, rows, "inject")
    return state


def inject_image(model, state: State, image, *, encoder, slot: int, position: int = 0,
                 layers: Optional[Sequence[int]] = None, label: Optional[str] = None) -> State:
    """Encode an image (or a short clip) with the Wan VAE encoder and put it in the bank.

    image: uint8 numpy [H, W, 3] or [T, H, W, 3], or a float tensor in [-1, 1] [3, H, W] or
        [T, 3, H, W], at the stream's size (8 x the latent size); a clip has 1 + 4k frames and
        makes 1 + k memory frames (slots slot, slot + 1, ...).
    encoder: `memflow_nb.load_vae_encoder(pipe)`. The rest as for `inject_latents`.
    """
    from .decode.encoder import encode_video

    check_state(model, state)
    pixels = _pixels(state, image)
    p = next(encoder.parameters())
    latents = encode_video(encoder, pixels.to(p.device))
    return inject_latents(model, state, latents.to(state.device, state.dtype), slot=slot, position=position,
                          layers=layers, label=label)


def ablate(model, state: State, group: str = "bank", *, layers: Optional[Sequence[int]] = None,
           heads: Optional[Sequence[int]] = None, chunks: Optional[int] = None) -> State:
    """Mask the bank (group="bank") or the sink (group="sink") for `layers` x `heads` (default all)
    in the next `chunks` chunks (default: for good). Nothing is deleted: the bank still refreshes
    and records; the masked heads just do not attend to it. Ablating every layer's bank gives
    exactly a stream without a bank from this chunk on.
    """
    check_state(model, state)
    cfg, sc = state.model_config, state.stream
    if group == "bank":
        _need_bank(state)
    elif group == "sink" and sc.sink_size == 0:
        raise ValueError("group='sink': this stream has no sink (sink_size=0)")
    ab = masks.ablation(group, cfg.num_layers, cfg.num_heads, layers, heads, state.chunk_index, chunks)
    kept = tuple(a for a in state.ablations if a.end_chunk is None or a.end_chunk > state.chunk_index)
    return dataclasses.replace(state, ablations=kept + (ab,))


@torch.no_grad()
def clean_kv(model, state: State, latents: torch.Tensor, rope_start: int) -> KV:
    """Keys/values [L, 2, B, F*T, H, D] of a clean pass (t = context_noise, the state's prompt) over
    latents [B, F, C, h, w] alone, the first frame at RoPE position `rope_start`."""
    B, F = latents.shape[:2]
    rec: list = []
    t = torch.full((B, F), float(state.stream.context_noise), device=state.device, dtype=torch.float32)
    model(latents, t, state.text_kv, rope_start, _SelfOnly(model.attention_backends, rec), need_output=False)
    return torch.stack([torch.stack(kv) for kv in rec])


class _SelfOnly(Attention):
    """Self-attention over the pass's own frames only, recording each layer's keys/values."""

    def __init__(self, backends, record: list):
        self.backends, self.record = backends, record

    def __call__(self, layer, q, k, v, need_output):
        self.record.append((k, v))
        return sdpa(q, k, v, self.backends) if need_output else None


# -- internals ------------------------------------------------------------------------------------

def _short(rows: Sequence[int]) -> str:
    return str(list(rows)) if len(rows) <= 6 else f"[{rows[0]}..{rows[-1]}]"


def _layers(state: State, layers) -> list[int]:
    return masks.check_indices("layers", layers, state.model_config.num_layers)


def _need_bank(state: State) -> None:
    sc = state.stream
    if sc.bank_size == 0 or sc.sink_size == 0:
        raise ValueError(f"this stream has no memory bank to change (bank_size={sc.bank_size}, "
                         f"sink_size={sc.sink_size}; the official sink-less path never reads the bank)")


def _check_frame(frame) -> None:
    if isinstance(frame, bool) or not isinstance(frame, int):
        raise TypeError(f"frame must be an int (a latent frame, or an outside picture's code), "
                        f"got {type(frame).__name__}")
    if frame == mem.EMPTY:
        raise ValueError("frame=-1 marks an empty slot, not a frame")


def _check_slot(state: State, slot, count: int) -> None:
    size = state.stream.bank_size
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot or slot + count > size:
        need = f"slot={slot!r}" if count == 1 else f"slots {slot}..{slot}+{count - 1}"
        raise ValueError(f"{need} out of range: the bank has bank_size={size} slots (0..{size - 1})")


def _not_pinned(state: State, slot: int, rows: Sequence[int]) -> None:
    if slot >= len(state.bank):
        return
    pinned = state.memory.pinned()[:, :, slot]  # [L, B]
    hit = [l for l in rows if bool(pinned[l].any())]
    if hit:
        frame = int(state.bank_frames[hit[0], 0, slot])
        raise ValueError(f"slot {slot} holds pinned frame {frame} in layers {_short(hit)}: unpin it first")


def _check_position(state: State, position, count: int) -> int:
    """The RoPE position of a memory frame at latent frame index `position` (re-based like a bank frame's)."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"position={position!r} must be a latent frame index >= 0")
    s = state.stream.sink_size
    start = position if position < s else max(position - state.pos_offset, s)
    table = state.model_config.rope_max_positions
    if start + count > table:
        raise ValueError(f"position={position} puts {count} frame(s) past the model's RoPE table ({table} positions, "
                         f"stream re-based by {state.pos_offset}); choose a smaller position")
    return start


def _check_latents(state: State, latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor, got {type(latents).__name__}")
    lat = latents.reshape(1, 1, *latents.shape) if latents.dim() == 3 else latents
    lat = lat[None] if lat.dim() == 4 else lat
    C, (h, w) = state.model_config.in_dim, state.latent_hw
    if lat.dim() != 5 or lat.shape[2:] != (C, h, w) or lat.shape[0] not in (1, state.batch) or lat.shape[1] < 1:
        batch = "1" if state.batch == 1 else f"1 or {state.batch}"
        raise ValueError(f"latents must be [{C}, {h}, {w}], [F, {C}, {h}, {w}] or [{batch}, F, {C}, {h}, {w}] (this "
                         f"stream's latent size), got {list(latents.shape)}")
    if not torch.isfinite(lat).all():
        raise ValueError("latents contain NaN or inf")
    return lat.expand(state.batch, *lat.shape[1:]).to(state.device, state.dtype)


def _pixels(state: State, image) -> torch.Tensor:
    """image (see inject_image) -> pixels [1, T, 3, H, W] float32 in [-1, 1], checked against the stream."""
    H, W = state.latent_hw[0] * 8, state.latent_hw[1] * 8
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"a numpy image must be uint8 [H, W, 3] (got dtype {image.dtype}); give floats as a "
                            "torch tensor in [-1, 1]")
        x = torch.from_numpy(np.ascontiguousarray(image)).float() / 127.5 - 1
        x = x.movedim(-1, -3) if x.dim() in (3, 4) else x
    elif isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
    else:
        raise TypeError(f"image must be a uint8 numpy array or a float tensor, got {type(image).__name__}")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"image must have 3 (RGB) channels: [H, W, 3] / [T, H, W, 3] uint8 or [3, H, W] / "
                         f"[T, 3, H, W] float, got shape {list(image.shape)}")
    if tuple(x.shape[2:]) != (H, W):
        raise ValueError(f"image is {x.shape[2]}x{x.shape[3]} pixels; this stream is {H}x{W} (height x width): "
                         "resize or crop it first")
    if (x.shape[0] - 1) % 4:
        raise ValueError(f"a clip needs 1 + 4k frames (1, 5, 9, ...), got {x.shape[0]}")
    return x[None]


def _kv_of(model, state: State, frame: int, rows: Sequence[int]) -> KV:
    """Keys/values [L, 2, B, T, H, D] of a frame the state holds (see replace_slot); only `rows` matter."""
    cached = dict(state.cache)
    bank = state.memory
    if frame in cached:
        return cached[frame]
    if frame == bank.pending_frame and bank.pending is not None:
        return bank.pending
    where = [(bank.frames[l, 0] == frame).nonzero() for l in rows]
    if all(len(w) for w in where):
        kv = torch.zeros_like(bank.slots[0])
        for l, w in zip(rows, where):
            kv[l] = bank.slots[int(w[0])][l]
        return kv
    latent = dict(bank.records).get(frame)
    first = state.position - state.history.shape[1]
    if latent is None and first <= frame < state.position:
        latent = state.history[:, frame - first]
    if latent is None:
        held = sorted(set(cached) | set(dict(bank.records)) | set(range(max(first, 0), state.position)))
        raise ValueError(f"frame={frame} is not held by this state (neither its keys/values nor its clean latents); "
                         f"frames it can use: {held}")
    outside = {o.code: o.position for o in bank.outside}
    position = outside.get(frame, frame)
    return clean_kv(model, state, latent[:, None], _check_position(state, position, 1))


def _put(state: State, slot: int, kv: Optional[KV], frame: int, rows: Sequence[int], kind: str) -> State:
    """The state with slot `slot` of layers `rows` holding kv (None: zeros) from `frame`, logged as `kind`."""
    bank = state.memory
    L, B = state.model_config.num_layers, state.batch
    cfg = state.model_config
    zero = torch.zeros(L, 2, B, state.tokens_per_frame, cfg.num_heads, cfg.head_dim,
                       device=state.device, dtype=state.dtype)
    slots, frames, scores = list(bank.slots), bank.frames.clone(), bank.scores.clone()
    while len(slots) <= slot:  # slots past the filled ones start empty
        slots.append(zero)
        frames = torch.cat([frames, torch.full((L, B, 1), mem.EMPTY, dtype=torch.long)], 2)
        scores = torch.cat([scores, torch.full((L, B, 1), float("nan"))], 2)
    chosen = torch.zeros(L, dtype=torch.bool)
    chosen[rows] = True
    new = zero if kv is None else kv.to(state.device, state.dtype)
    slots[slot] = torch.where(chosen.to(state.device)[:, None, None, None, None, None], new, slots[slot])
    frames[chosen, :, slot] = frame
    scores[chosen, :, slot] = float("nan")
    after = dataclasses.replace(bank, slots=tuple(slots), frames=frames, scores=scores).pruned()
    event = mem.MemoryEvent(chunk=state.chunk_index, kind=kind, new_frame=frame, frames_before=bank.frames,
                            frames_after=frames, scores=None, text_zeroed=False, outside=after.labels())
    return dataclasses.replace(state, memory=after, memory_log=(state.memory_log + (event,))[-MEMORY_LOG_MAX:])

"""The pure functions that start and advance a stream: init_state, step, set_prompt, update_memory.

Each takes the model and a `State` and returns a new State (see state.py); none writes into a
tensor an old state holds. The model is a `CausalWanModel` or a wrapper that holds its speed
pieces (`memflow_nb.fast.optimize_model`): anything with the model's `cfg`, `instance_id`,
`observers`, `text_kv`, `parameters` and call signature, plus `attention_backends` (SDPA kernel
order, None for PyTorch's choice) and `graphs` (a CUDA-graph pass runner, or None).

Observers (observers.py) are values: passed to a call, or bound to the model for this thread.

Positions: RoPE positions are the absolute latent-frame indices, as officially, until the next
chunk would pass the model's table (`rope_max_positions`, 1024 for Wan2.1: about 4 minutes of
video). Then the stream is re-based: the window's and the bank's stored keys are rotated back so
that the next chunk starts at half the table. The spacing inside the visible window, and between
it and every bank frame, is kept exactly; the sink keeps positions 0..sink-1, and a bank frame
never moves before the sink (its position is max(frame - offset, sink_size)). So no position past
the trained range is ever used and the stream never resets. See `State.pos_offset`.

The cache keeps the sink frames and the last `local - sink - chunk` frames: the only ones any
later pass reads (context.py says which frames a pass sees).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from . import memory as mem
from .checks import check_memory, check_model, check_prompt_embeds, check_seed, check_state
from .config import StreamConfig, latent_size, warn_unofficial
from .context import PassAttention, PassKV, Workspace
from .model import rotate_time
from .noise import step_noise
from .observers import Observer
from .schedule import add_noise, denoising_schedule, flow_to_x0
from .state import KV, MEMORY_LOG_MAX, State


@torch.no_grad()
def init_state(model, stream: StreamConfig, prompt_embeds: torch.Tensor, *,
               height: int, width: int, seed: int = 0) -> State:
    """A fresh stream at frame 0.

    Args:
        model: the DiT (or its fast wrapper); latents and caches live on its device, in its dtype.
        stream: streaming settings.
        prompt_embeds: text-encoder output [B, Ltxt, text_dim] (or [Ltxt, text_dim] for B=1).
        height, width: video size in pixels, multiples of 16 (latents are 1/8 of it).
        seed: noise seed; chunk c draws from a generator seeded by (seed, c).
    """
    check_model(model)
    if not isinstance(stream, StreamConfig):
        raise TypeError(f"stream must be a StreamConfig, got {type(stream).__name__}")
    h, w = latent_size(height, width)
    check_seed(seed)
    warn_unofficial(stream)
    pe = check_prompt_embeds(model, prompt_embeds)
    check_memory(model, stream, h, w, pe.shape[0])
    text_kv = model.text_kv(pe)
    cfg = model.cfg
    B = pe.shape[0]
    return State(
        model_id=model.instance_id, model_config=cfg, stream=stream, batch=B, latent_hw=(h, w),
        seed=int(seed), position=0, prompt_embeds=pe, text_kv=text_kv, nam_text_zeroed=True, cache=(),
        memory=mem.Bank.empty(cfg.num_layers, B), memory_log=(),
        history=torch.zeros(B, 0, cfg.in_dim, h, w, device=text_kv.device, dtype=text_kv.dtype),
    )


@torch.no_grad()
def step(model, state: State, *, noise: Optional[torch.Tensor] = None,
         renoise: Optional[Sequence[torch.Tensor]] = None,
         observers: Sequence[Observer] = ()) -> tuple[State, torch.Tensor]:
    """Generate one chunk: bank refresh, the denoising steps, then the clean pass that writes the cache.

    Args:
        model: the model that made `state` (or its fast wrapper).
        noise: initial noise [B, chunk, C, h, w]; drawn from (seed, chunk index) when None.
        renoise: one noise tensor [B, chunk, C, h, w] per step transition (len(steps) - 1).
        observers: see attention and bank refreshes of this call (besides those bound to the model).
    Returns:
        (new state, clean latents x0 [B, chunk, C, h, w]).
    """
    check_state(model, state)
    observers = _observers(model, observers)
    sc, steps = state.stream, denoising_schedule(state.stream)
    B, (h, w), n = state.batch, state.latent_hw, sc.chunk_frames
    shape = (B, n, model.cfg.in_dim, h, w)
    prof = torch.profiler.record_function  # labels for `bench --profile`; near free when off
    with prof("memflow.noise"):
        noise, renoise = step_noise(state.seed, state.chunk_index, shape, noise, renoise, len(steps) - 1,
                                    state.device, state.dtype)
    state = _rebase(state, state.position + n)
    p0 = state.position
    # The refresh runs before the blocks of the first denoising call, with the text keys as they
    # are then (zero right after a switch); the blocks then compute this prompt's text K/V.
    # The single-prompt pipeline asks for the refresh only on a first step that is not the last.
    if not (sc.bank_record_every_chunk and len(steps) == 1):
        with prof("memflow.refresh"):
            state = update_memory(model, state, observers=observers)
    ws = Workspace(state, p0, p0 + n, recompute=False)
    graphs = _graphs_for(model, ws, observers)
    x = noise
    for i, st in enumerate(steps):
        with prof("memflow.denoise_pass"):
            if graphs is not None:  # the graph takes the timestep into its own static buffer
                flow = graphs.run(ws, x, st.timestep, "denoise")
            else:
                t = torch.full((B, n), st.timestep, device=state.device, dtype=torch.float32)
                attend = PassAttention(ws, "denoise", i, observers=observers, backends=model.attention_backends)
                flow = model(x, t, state.text_kv, ws.rope_start, attend)
            x0 = flow_to_x0(x, flow, st.sigma)
        if i + 1 < len(steps):
            x = add_noise(x0, renoise[i], steps[i + 1].sigma)
    state = dataclasses.replace(state, nam_text_zeroed=False)
    if len(steps) == 1 and not sc.bank_record_every_chunk:
        # Official (interactive) quirk: q_bank keeps its last loop value, True when there is a single step,
        # so the clean pass refreshes the bank once more.
        state = update_memory(model, state, observers=observers)
        ws = Workspace(state, p0, p0 + n, recompute=False)
        graphs = _graphs_for(model, ws, observers)
    with prof("memflow.clean_pass"):
        if graphs is not None:
            new_kv = graphs.run(ws, x0, float(sc.context_noise), "clean")
        else:
            new_kv = _clean_pass(model, state, x0, ws, "clean", observers)
    del ws
    with prof("memflow.commit"):
        return _commit_chunk(state, new_kv, x0), x0


@torch.no_grad()
def set_prompt(model, state: State, prompt_embeds: torch.Tensor, *,
               observers: Sequence[Observer] = ()) -> State:
    """Switch the prompt before the next chunk, with MemFlow's KV re-cache.

    The last min(local_attn_size, position) clean latents are run again at t=context_noise under
    the new prompt; their keys/values replace the cached ones (the sink keeps the old prompt's
    unless the re-cache starts at frame 0). The bank is refreshed with all-zero text keys, as the
    official code does, and the next chunk's refresh sees zero text keys too.

    Args:
        prompt_embeds: [B, Ltxt, text_dim] (or [Ltxt, text_dim]).
        observers: see the re-cache pass and the bank refresh (besides those bound to the model).
    """
    check_state(model, state)
    observers = _observers(model, observers)
    sc = state.stream
    pe = check_prompt_embeds(model, prompt_embeds)
    if pe.shape[0] != state.batch:
        raise ValueError(f"prompt_embeds batch {pe.shape[0]} != state batch {state.batch}")
    cache = state.cache
    if not sc.global_sink:
        cache = tuple((f, torch.zeros_like(kv)) for f, kv in cache)
    new = dataclasses.replace(state, prompt_embeds=pe, text_kv=model.text_kv(pe), nam_text_zeroed=True,
                              cache=cache)
    s = state.position
    if s == 0:
        return new
    n = min(sc.local_attn_size, s)
    p0, recompute = s - n, s - n > 0
    new = update_memory(model, new, observers=observers)
    # Only the frames the cache keeps are recorded: the pass runs all n, but the frames under the
    # sink and those before the window are read by this pass alone.
    kept = _kept_frames(sc, p0, s, recompute)
    ws = Workspace(new, p0, s, recompute=recompute, one_pass=True)
    new_kv = _clean_pass(model, new, new.history[:, -n:], ws, "recache", observers, [f - p0 for f in kept])
    return dataclasses.replace(new, cache=_merge_cache(new, new_kv, kept, s))


@torch.no_grad()
def update_memory(model, state: State, *, text_kv: Optional[torch.Tensor] = None,
                  observers: Sequence[Observer] = ()) -> State:
    """The NAM bank refresh. `step` runs it before each chunk; call it yourself to study it.

    While the bank has free slots the newest record is put in slot n_records - 1. Once it is
    full, each layer scores its slots against the text keys (the active prompt's, zeros right
    after a switch, or `text_kv` [L, 2, B, text_len, H, D] if given), keeps the bank_size - 1
    best (best first) and appends the newest record (see `memory.refresh`).
    """
    check_state(model, state)
    text_k = (text_kv if text_kv is not None else state.text_kv)[:, 0]
    bank, event = mem.refresh(state.memory, text_k, bank_size=state.stream.bank_size, chunk=state.chunk_index,
                              text_zeroed=text_kv is None and state.nam_text_zeroed)
    if event is None:
        return state
    for ob in _observers(model, observers):
        ob.memory_event(event)
    return dataclasses.replace(state, memory=bank, memory_log=(state.memory_log + (event,))[-MEMORY_LOG_MAX:])


# -- internals ----------------------------------------------------------------------------------

def _observers(model, given: Sequence[Observer]) -> tuple[Observer, ...]:
    bound = model.observers.current()
    given = tuple(given)
    return given + tuple(o for o in bound if not any(o is g for g in given))


def _graphs_for(model, ws: Workspace, observers):
    """The model's CUDA-graph runner, prepared for this workspace, when it can serve it.

    Never while observers watch: they must see every eager call.
    """
    graphs = model.graphs
    if graphs is None or observers or not graphs.usable(ws):
        return None
    graphs.prepare(ws)
    return graphs


def _clean_pass(model, state: State, x0: torch.Tensor, ws: Workspace, kind: str, observers,
                frames: Optional[Sequence[int]] = None) -> KV:
    """Run x0 at t = context_noise; return this pass's keys/values of its frames `frames` (None: all)
    [L, 2, B, len(frames)*T, H, D], written layer by layer into that one tensor."""
    B, f = x0.shape[:2]
    rec = PassKV(model.cfg.num_layers, state.tokens_per_frame, frames)
    t = torch.full((B, f), float(state.stream.context_noise), device=state.device, dtype=torch.float32)
    attend = PassAttention(ws, kind, -1, observers=observers, backends=model.attention_backends, record=rec)
    model(x0, t, state.text_kv, ws.rope_start, attend, need_output=False)
    return rec.kv


def _rotate_kv(kv: KV, delta) -> KV:
    """kv [L, 2, B, T, H, D] with its keys moved by delta frames (scalar or [L, B])."""
    d = torch.as_tensor(delta, device=kv.device)
    if d.dim() == 2:
        d = d[:, :, None, None]
    return torch.stack([rotate_time(kv[:, 0], d), kv[:, 1]], dim=1)


def _rebase(state: State, next_end: int) -> State:
    """Re-base RoPE positions when a pass ending at frame `next_end` would pass the table."""
    table = state.model_config.rope_max_positions
    if next_end - state.pos_offset <= table:
        return state
    s = state.stream.sink_size
    old, new = state.pos_offset, state.position - table // 2
    cache = tuple((f, kv if f < s else _rotate_kv(kv, old - new)) for f, kv in state.cache)

    def moved(frames: torch.Tensor) -> torch.Tensor:  # position change of bank-like frames
        return (frames - new).clamp(min=s) - (frames - old).clamp(min=s)

    bank = state.memory
    positions = bank.positions()
    slots = tuple(_rotate_kv(slot, moved(positions[:, :, j])) for j, slot in enumerate(bank.slots))
    pending = bank.pending
    if pending is not None:
        pending = _rotate_kv(pending, int(moved(torch.tensor(bank.pending_frame))))
    memory = dataclasses.replace(bank, slots=slots, pending=pending)
    return dataclasses.replace(state, cache=cache, memory=memory, pos_offset=new)


def _kept_frames(sc: StreamConfig, p0: int, p1: int, recompute: bool) -> list[int]:
    """Frames of a pass over [p0, p1) that the cache holds after it: the sink and the last
    `prev_frames` before p1. A re-cache never rewrites the sink slots (the official code protects them)."""
    return [f for f in range(p0, p1)
            if not (recompute and f < p0 + sc.sink_size) and (f < sc.sink_size or f >= p1 - sc.prev_frames)]


def _merge_cache(state: State, new_kv: KV, held: Sequence[int], p1: int):
    """Cache after a pass ending at frame p1 whose new_kv holds the frames `held`, in order:
    the sink and the last `prev_frames` frames before p1."""
    sc, T = state.stream, state.tokens_per_frame
    frames = dict(state.cache)
    for j, f in enumerate(held):
        frames[f] = new_kv[:, :, :, j * T:(j + 1) * T]
    keep_from = p1 - sc.prev_frames
    return tuple(sorted((f, kv) for f, kv in frames.items() if f < sc.sink_size or f >= keep_from))


def _commit_chunk(state: State, new_kv: KV, x0: torch.Tensor) -> State:
    sc, T = state.stream, state.tokens_per_frame
    p0, n = state.position, x0.shape[1]
    c = state.chunk_index
    memory = state.memory
    if sc.bank_size > 0 and (c % sc.record_interval == 0 or sc.bank_record_every_chunk):
        # The chunk's first latent frame becomes the prototype that enters the bank next chunk
        # (every chunk in the single-prompt pipeline; the pointer counts record_interval chunks).
        memory = memory.with_record(p0, new_kv[:, :, :, :T].clone(), x0[:, 0], c // sc.record_interval + 1)
    hist = torch.cat([state.history, x0], dim=1)[:, -sc.local_attn_size:]
    cache = _merge_cache(state, new_kv, range(p0, p0 + n), p0 + n)
    return dataclasses.replace(state, cache=cache, position=p0 + n, history=hist, memory=memory)

"""Streaming state and the pure functions that advance it.

A `State` is immutable by convention: every function returns a new State and never writes into a
tensor the old one holds. New states share unchanged tensors with old ones (structural sharing),
so keeping old states around (fork / resume) costs only what changed, and stepping twice from the
same state gives the same result.

How the official MemFlow context is expressed here, per latent frame instead of token offsets:
a pass over frames [p0, p1) attends to
    [sink frames 0..sink-1 | visible bank slots | local frames max(sink, p1-(local-sink)) .. p1-1]
where a frame comes from this pass if the pass covers it (sink frames only when the pass is not
a re-cache of already cached frames), otherwise from the cache, and unwritten sink frames are
zeros. The cache keeps the sink frames and the last `local - sink - chunk` frames: the only ones
any later pass reads.

Positions: RoPE positions are the absolute latent-frame indices, as officially, until the next
chunk would pass the model's table (`rope_max_positions`, 1024 for Wan2.1: about 4 minutes of
video). Then the stream is re-based: the window's and the bank's stored keys are rotated back so
that the next chunk starts at half the table. The spacing inside the visible window, and between
it and every bank frame, is kept exactly; the sink keeps positions 0..sink-1, and a bank frame
never moves before the sink (its position is max(frame - offset, sink_size)). So no position past
the trained range is ever used and the stream never resets. See `State.pos_offset`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import memory as mem
from .config import ModelConfig, StreamConfig, latent_size
from .model import CausalWanModel, sdpa
from .schedule import add_noise, denoising_schedule, flow_to_x0

KV = torch.Tensor  # [L, 2, B, T * frames, H, D]

# Active inspection recorders (memflow_nb.inspect). Empty unless a recording context is open;
# the engine checks it once per pass, so nothing runs and nothing is kept when it is empty.
RECORDERS: list = []

# Bank refreshes kept in State.memory_log; older ones are dropped so endless streams stay flat
# in memory (an inspection recording keeps every event).
MEMORY_LOG_MAX = 512


@dataclass(frozen=True, eq=False)
class State:
    """Everything a stream carries between chunks. Treat every tensor as read-only.

    Shapes: L layers, B batch, T tokens per latent frame, H heads, D head dim, C latent channels.
    """

    model_id: str
    model_config: ModelConfig
    stream: StreamConfig
    batch: int
    latent_hw: tuple[int, int]
    seed: int
    position: int  # latent frames generated so far = start frame of the next chunk
    prompt_embeds: torch.Tensor  # [B, Ltxt, text_dim] the active prompt
    text_kv: torch.Tensor  # [L, 2, B, text_len, H, D] cross-attention K/V of the active prompt
    nam_text_zeroed: bool  # official quirk: the first bank refresh after a (re)start sees zero text keys
    cache: tuple[tuple[int, torch.Tensor], ...]  # (frame, kv [L, 2, B, T, H, D]) in frame order
    bank: tuple[torch.Tensor, ...]  # slots, kv [L, 2, B, T, H, D]
    bank_frames: torch.Tensor  # [L, B, n_slots] long: source latent frame of each slot
    bank_scores: torch.Tensor  # [L, B, n_slots] float32: last NAM score (nan: not scored yet)
    pending: Optional[torch.Tensor]  # newest record, enters the bank at the next refresh
    pending_frame: int  # -1 if none
    n_records: int  # records made so far (the official bank pointer)
    history: torch.Tensor  # [B, n <= local_attn_size, C, h, w] clean latents of the last frames
    records: tuple[tuple[int, torch.Tensor], ...]  # clean latents [B, C, h, w] of frames in bank/pending
    memory_log: tuple[mem.MemoryEvent, ...]  # the last MEMORY_LOG_MAX bank refreshes
    pos_offset: int = 0  # RoPE position = frame - pos_offset (see module docstring)

    @property
    def chunk_index(self) -> int:
        return self.position // self.stream.chunk_frames

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.model_config.patch_size
        return (self.latent_hw[0] // ph) * (self.latent_hw[1] // pw)

    @property
    def device(self) -> torch.device:
        return self.text_kv.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_kv.dtype

    def nbytes(self) -> int:
        """Bytes of the distinct tensors this state holds (shared storage counted once)."""
        seen, total = set(), 0
        tensors = [self.prompt_embeds, self.text_kv, self.history, self.bank_frames, self.bank_scores]
        tensors += [t for _, t in self.cache] + list(self.bank) + [t for _, t in self.records]
        tensors += [self.pending] if self.pending is not None else []
        for t in tensors:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        return total


# -- public API ---------------------------------------------------------------------------------

@torch.no_grad()
def init_state(model: CausalWanModel, stream: StreamConfig, prompt_embeds: torch.Tensor, *,
               height: int, width: int, seed: int = 0) -> State:
    """A fresh stream at frame 0.

    Args:
        model: the DiT; latents and caches live on its device, in its dtype.
        stream: streaming settings.
        prompt_embeds: text-encoder output [B, Ltxt, text_dim] (or [Ltxt, text_dim] for B=1).
        height, width: video size in pixels, multiples of 16 (latents are 1/8 of it).
        seed: noise seed; chunk c draws from a generator seeded by (seed, c).
    """
    if not isinstance(model, CausalWanModel) and not hasattr(model, "instance_id"):
        raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
    if not isinstance(stream, StreamConfig):
        raise TypeError(f"stream must be a StreamConfig, got {type(stream).__name__}")
    h, w = latent_size(height, width)
    _check_seed(seed)
    pe = _prompt_embeds(model, prompt_embeds)
    _check_memory(model, stream, h, w, pe.shape[0])
    text_kv = model.text_kv(pe)
    cfg: ModelConfig = model.cfg
    B = pe.shape[0]
    L = cfg.num_layers
    dev, dt = text_kv.device, text_kv.dtype
    return State(
        model_id=model.instance_id, model_config=cfg, stream=stream, batch=B, latent_hw=(h, w),
        seed=int(seed), position=0, prompt_embeds=pe, text_kv=text_kv, nam_text_zeroed=True,
        cache=(), bank=(), bank_frames=torch.zeros(L, B, 0, dtype=torch.long),
        bank_scores=torch.zeros(L, B, 0), pending=None, pending_frame=-1, n_records=0,
        history=torch.zeros(B, 0, cfg.in_dim, h, w, device=dev, dtype=dt), records=(), memory_log=(),
    )


@torch.no_grad()
def step(model: CausalWanModel, state: State, *, noise: Optional[torch.Tensor] = None,
         renoise: Optional[Sequence[torch.Tensor]] = None) -> tuple[State, torch.Tensor]:
    """Generate one chunk: bank refresh, the denoising steps, then the clean pass that writes the cache.

    Args:
        noise: initial noise [B, chunk, C, h, w]; drawn from (seed, chunk index) when None.
        renoise: one noise tensor [B, chunk, C, h, w] per step transition (len(steps) - 1).
    Returns:
        (new state, clean latents x0 [B, chunk, C, h, w]).
    """
    _check(model, state)
    sc, steps = state.stream, denoising_schedule(state.stream)
    B, (h, w), n = state.batch, state.latent_hw, sc.chunk_frames
    shape = (B, n, model.cfg.in_dim, h, w)
    prof = torch.profiler.record_function  # labels for `bench --profile`; near free when off
    with prof("memflow.noise"):
        noise, renoise = _chunk_noise(state, shape, noise, renoise, len(steps) - 1)
    state = _rebase(state, state.position + n)
    p0 = state.position
    # The refresh runs before the blocks of the first denoising call, with the text keys as they
    # are then (zero right after a switch); the blocks then compute this prompt's text K/V.
    with prof("memflow.refresh"):
        state = update_memory(model, state)
    ctx = _Context(state, p0, p0 + n, recompute=False)
    graphs = _graphs_for(model, ctx)
    x = noise
    for i, st in enumerate(steps):
        with prof("memflow.denoise_pass"):
            if graphs is not None:  # the graph takes the timestep into its own static buffer
                flow = graphs.run(ctx, x, st.timestep, "denoise")
            else:
                t = torch.full((B, n), st.timestep, device=state.device, dtype=torch.float32)
                flow = model(x, t, state.text_kv, ctx.rope_start, ctx.attend_fn("denoise", i))
            x0 = flow_to_x0(x, flow, st.sigma)
        if i + 1 < len(steps):
            x = add_noise(x0, renoise[i], steps[i + 1].sigma)
    state = dataclasses.replace(state, nam_text_zeroed=False)
    if len(steps) == 1:
        # Official quirk: q_bank keeps its last loop value, True when there is a single step,
        # so the clean pass refreshes the bank once more.
        state = update_memory(model, state)
        ctx = _Context(state, p0, p0 + n, recompute=False)
        graphs = _graphs_for(model, ctx)
    with prof("memflow.clean_pass"):
        if graphs is not None:
            new_kv = graphs.run(ctx, x0, float(sc.context_noise), "clean")
        else:
            new_kv = _clean_pass(model, state, x0, ctx, kind="clean")
    del ctx
    with prof("memflow.commit"):
        return _commit_chunk(state, new_kv, x0), x0


@torch.no_grad()
def set_prompt(model: CausalWanModel, state: State, prompt_embeds: torch.Tensor) -> State:
    """Switch the prompt before the next chunk, with MemFlow's KV re-cache.

    The last min(local_attn_size, position) clean latents are run again at t=context_noise under
    the new prompt; their keys/values replace the cached ones (the sink keeps the old prompt's
    unless the re-cache starts at frame 0). The bank is refreshed with all-zero text keys, as the
    official code does, and the next chunk's refresh sees zero text keys too.

    Args:
        prompt_embeds: [B, Ltxt, text_dim] (or [Ltxt, text_dim]).
    """
    _check(model, state)
    sc = state.stream
    pe = _prompt_embeds(model, prompt_embeds)
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
    new = update_memory(model, new)
    frames = new.history[:, -n:]
    ctx = _Context(new, s - n, s, recompute=s - n > 0)
    new_kv = _clean_pass(model, new, frames, ctx, kind="recache")
    return dataclasses.replace(new, cache=_merge_cache(new, new_kv, s - n, s, recompute=s - n > 0))


@torch.no_grad()
def update_memory(model: CausalWanModel, state: State, *, text_kv: Optional[torch.Tensor] = None) -> State:
    """The NAM bank refresh. `step` runs it before each chunk; call it yourself to study it.

    While the bank has free slots the newest record is put in slot n_records - 1. Once it is
    full, each layer scores its slots against the text keys (the active prompt's, zeros right
    after a switch, or `text_kv` [L, 2, B, text_len, H, D] if given), keeps the bank_size - 1
    best (best first) and appends the newest record.
    """
    _check(model, state)
    sc, n = state.stream, state.n_records
    if sc.bank_size == 0 or n == 0 or state.pending is None:
        return state
    L, B = model.cfg.num_layers, state.batch
    pend_frames = torch.full((L, B, 1), state.pending_frame, dtype=torch.long)
    before = state.bank_frames
    if n <= sc.bank_size:
        slots, frames, scores = list(state.bank), before.clone(), state.bank_scores.clone()
        while len(slots) < n - 1:  # never-filled slots read as zeros in the reference
            slots.append(torch.zeros_like(state.pending))
            frames = torch.cat([frames, torch.full((L, B, 1), -1, dtype=torch.long)], 2)
            scores = torch.cat([scores, torch.full((L, B, 1), math.nan)], 2)
        if len(slots) >= n:
            slots[n - 1] = state.pending
            frames[:, :, n - 1] = state.pending_frame
            scores[:, :, n - 1] = math.nan
        else:
            slots.append(state.pending)
            frames = torch.cat([frames, pend_frames], 2)
            scores = torch.cat([scores, torch.full((L, B, 1), math.nan)], 2)
        slots, kind, all_scores = tuple(slots), "insert", None
    else:
        zeroed = text_kv is None and state.nam_text_zeroed
        tk = text_kv[:, 0] if text_kv is not None else state.text_kv[:, 0]
        if zeroed:
            tk = torch.zeros_like(tk)
        all_scores = mem.nam_scores(tk, state.bank).cpu()
        kept, kept_frames, kept_scores = mem.compress(state.bank, before, all_scores, sc.bank_size - 1)
        slots = kept + (state.pending,)
        frames = torch.cat([kept_frames, pend_frames], 2)
        scores = torch.cat([kept_scores, torch.full((L, B, 1), math.nan)], 2)
        kind = "compress"
    event = mem.MemoryEvent(chunk=state.chunk_index, kind=kind, new_frame=state.pending_frame,
                            frames_before=before, frames_after=frames, scores=all_scores,
                            text_zeroed=kind == "compress" and text_kv is None and state.nam_text_zeroed)
    for ob in tuple(RECORDERS):
        ob.memory_event(event)
    return dataclasses.replace(state, bank=slots, bank_frames=frames, bank_scores=scores,
                               records=_live_records(state.records, frames, state.pending_frame),
                               memory_log=(state.memory_log + (event,))[-MEMORY_LOG_MAX:])


def chunk_noise(seed: int, chunk: int, shape: Sequence[int], count: int) -> list[torch.Tensor]:
    """`count` standard-normal float32 CPU tensors for one chunk, from a generator seeded by (seed, chunk).

    The same (seed, chunk) gives the same bits on every machine; no chunk's noise depends on another's.
    """
    g = torch.Generator().manual_seed(_mix_seed(seed, chunk))
    return [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for _ in range(count)]


# -- internals ----------------------------------------------------------------------------------

def _graphs_for(model, ctx: "_Context"):
    """The model's CUDA-graph runner, prepared for this context, when it can serve it (see graphs.py).

    Never while an inspection recorder is open: recorders must see every eager call.
    """
    from .model import CROSS_OBSERVERS

    graphs = getattr(model, "pass_graphs", None)
    if graphs is None or RECORDERS or CROSS_OBSERVERS or not graphs.usable(ctx):
        return None
    graphs.prepare(ctx)
    return graphs


def _check(model, state: State) -> None:
    if not isinstance(state, State):
        raise TypeError(f"expected a memflow_nb State, got {type(state).__name__}")
    mid = getattr(model, "instance_id", None)
    if mid != state.model_id:
        raise ValueError("this state was made with another model instance; states only step with "
                         "the model that created them (make a new one with init_state)")


def stream_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw: tuple[int, int], batch: int = 1,
                 elem: int = 2) -> int:
    """Rough bytes a stream needs at this size: the state (sink, window, bank, pending, the chunk
    being made), the attention workspace, and one pass's activations."""
    _, ph, pw = cfg.patch_size
    T = (latent_hw[0] // ph) * (latent_hw[1] // pw)
    frame_kv = 2 * T * cfg.dim * cfg.num_layers * batch * elem
    frames = stream.sink_size + stream.prev_frames + stream.bank_size + 1 + stream.chunk_frames
    workspace = stream.sink_size + stream.bank_size + stream.prev_frames + stream.chunk_frames
    activations = 6 * stream.chunk_frames * T * max(cfg.ffn_dim, cfg.dim) * batch * elem
    return (frames + workspace) * frame_kv + activations


def _free_bytes(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None  # unknown platform: no check


def _check_memory(model, stream: StreamConfig, h: int, w: int, batch: int) -> None:
    """Refuse, before allocating anything, a size whose stream cannot fit in free memory."""
    p = next(model.parameters())
    need = stream_bytes(model.cfg, stream, (h, w), batch, p.element_size())
    free = _free_bytes(p.device)
    if free is not None and need > free:
        raise ValueError(f"a {h * 8}x{w * 8} stream needs about {need / 1e9:.1f} GB for its state and attention "
                         f"workspace, but only {free / 1e9:.1f} GB is free on {p.device}; use a smaller size")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed} is outside [0, 2**63)")


def _prompt_embeds(model, pe: torch.Tensor) -> torch.Tensor:
    if not isinstance(pe, torch.Tensor):
        raise TypeError(f"prompt_embeds must be a tensor, got {type(pe).__name__}")
    if pe.dim() == 2:
        pe = pe.unsqueeze(0)
    cfg = model.cfg
    if pe.dim() != 3 or pe.shape[-1] != cfg.text_dim:
        raise ValueError(f"prompt_embeds must be [B, L, {cfg.text_dim}] for this model (text_dim={cfg.text_dim}), "
                         f"got {list(pe.shape)}")
    if pe.shape[1] > cfg.text_len:
        raise ValueError(f"prompt_embeds has {pe.shape[1]} tokens; the model takes at most text_len={cfg.text_len}")
    if not torch.isfinite(pe).all():
        raise ValueError("prompt_embeds contains NaN or inf")
    w = model.text_embedding[0].weight
    return pe.to(w.device, w.dtype)


def _mix_seed(seed: int, chunk: int) -> int:
    # splitmix64 of the pair: decorrelated streams, stable across platforms and torch versions.
    z = (seed * 0x9E3779B97F4A7C15 + chunk + 1) & 0xFFFFFFFFFFFFFFFF
    for m in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB):
        z = ((z ^ (z >> 30 if m == 0xBF58476D1CE4E5B9 else z >> 27)) * m) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _chunk_noise(state, shape, noise, renoise, n_renoise):
    if noise is None or (renoise is None and n_renoise > 0):
        drawn = chunk_noise(state.seed, state.chunk_index, shape, 1 + n_renoise)
        noise = drawn[0] if noise is None else noise
        renoise = drawn[1:] if renoise is None else renoise
    renoise = list(renoise) if renoise is not None else []
    if len(renoise) < n_renoise:
        raise ValueError(f"renoise needs {n_renoise} tensors (one per step transition), got {len(renoise)}")
    def fit(t, name):
        t = torch.as_tensor(t)
        if t.numel() != math.prod(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        t = t.reshape(shape)
        if state.device.type == "cuda" and t.device.type == "cpu":
            # Pinned memory makes the upload asynchronous: no stall of the GPU queue per chunk.
            return t.to(state.dtype).pin_memory().to(state.device, non_blocking=True)
        return t.to(state.device, state.dtype)
    return fit(noise, "noise"), [fit(r, f"renoise[{i}]") for i, r in enumerate(renoise[:n_renoise])]


def _layout(state: State, p0: int, p1: int, recompute: bool):
    """Key pieces of a pass over frames [p0, p1): (sink, bank, local), each a list of
    ('cache', kv) | ('cur', frame offset in the pass) | ('zero', None) per frame."""
    sc = state.stream
    cached = dict(state.cache)
    def frame(f, allow_cur):
        if allow_cur and p0 <= f < p1:
            return ("cur", f - p0)
        if f in cached:
            return ("cache", cached[f])
        return ("zero", None)
    sink = [frame(f, not recompute) for f in range(sc.sink_size)]
    lo = max(sc.sink_size, p1 - (sc.local_attn_size - sc.sink_size))
    local = [frame(f, True) for f in range(lo, p1)]
    bank = []
    if sc.sink_size > 0 and sc.bank_size > 0:  # the official sink-less path never reads the bank
        visible = min(state.n_records, sc.bank_size)
        bank = [("cache", state.bank[j]) if j < len(state.bank) else ("zero", None) for j in range(visible)]
    return sink, bank, local


@dataclass(frozen=True)
class PassInfo:
    """What an inspection recorder is told about the pass whose attention it sees."""

    chunk: int  # chunk index the pass belongs to (a re-cache belongs to the chunk that follows it)
    kind: str  # "denoise", "clean" or "recache"
    step: int  # denoising step index, -1 for clean / re-cache passes
    frames: tuple[int, int]  # query frames [p0, p1)
    key_frames: tuple  # per key frame, in key order: (group, frame, slot), see memflow_nb.inspect
    bank_frames: torch.Tensor  # [L, B, n] source frame per bank slot (per layer)
    tokens_per_frame: int


# The fast path keeps, per chunk, one key/value workspace per layer with the context written once;
# each pass only writes its own keys into the tail. Tests switch it off to compare with the
# reference path, which concatenates the pieces on every pass; both give the same bits.
USE_WORKSPACE = True


class _Context:
    """The self-attention context of a group of passes over frames [p0, p1) (see module docstring).

    A chunk's denoising passes and its clean pass share one context (same frames, same bank).
    """

    def __init__(self, state: State, p0: int, p1: int, recompute: bool):
        self.state, self.p0, self.p1 = state, p0, p1
        self.rope_start = p0 - state.pos_offset  # RoPE position of frame p0
        self.T = state.tokens_per_frame
        self.sink, self.bank, self.local = _layout(state, p0, p1, recompute)
        self.sma = state.stream.sma and state.stream.sink_size > 0 and bool(self.sink + self.bank)
        self.n_glob = len(self.sink) + len(self.bank)  # SMA chooses among these leading frames
        self.ws = None
        pieces = self.sink + self.bank + self.local
        n_cur = sum(1 for kind, _ in pieces if kind == "cur")
        head, tail = pieces[:len(pieces) - n_cur], pieces[len(pieces) - n_cur:]
        cur = [val for kind, val in tail if kind == "cur"]
        # Fast form: cached frames first, then this pass's own frames as one increasing run (with
        # SMA the sink and bank must be cached too, since they form the prefix SMA chooses from).
        if (USE_WORKSPACE and len(cur) == n_cur and all(kind == "cache" for kind, _ in head)
                and (not self.sma or len(head) >= self.n_glob)
                and cur == list(range(cur[0] if cur else 0, (cur[0] if cur else 0) + n_cur))):
            self.prefix = [val for _, val in head]
            self.cur = (cur[0] * self.T, (cur[0] + n_cur) * self.T) if cur else (0, 0)
            self.ws = False  # built on first use, when dtype and device are known

    def _workspace(self, k: torch.Tensor) -> torch.Tensor:
        """[L, 2, B, n_prefix * T + n_cur * T, H, D] with the cached prefix written in."""
        L = self.state.model_config.num_layers
        B, _, H, D = k.shape
        n_pre = len(self.prefix) * self.T
        ws = k.new_empty(L, 2, B, n_pre + self.cur[1] - self.cur[0], H, D)
        for i, frame_kv in enumerate(self.prefix):  # every piece is one frame of all layers
            ws[:, :, :, i * self.T:(i + 1) * self.T].copy_(frame_kv)
        self.n_pre = n_pre
        return ws

    def labels(self) -> tuple:
        sc = self.state.stream
        lo = max(sc.sink_size, self.p1 - (sc.local_attn_size - sc.sink_size))
        return tuple([("sink", f, -1) for f in range(len(self.sink))] + [("bank", -1, j) for j in range(len(self.bank))]
                     + [("current" if self.p0 <= f < self.p1 else "local", f, -1) for f in range(lo, self.p1)])

    def attend_fn(self, kind: str, step: int, record: Optional[list] = None):
        """The `attend(layer, q, k, v, need_output)` callback of one pass."""
        T, st = self.T, self.state
        observers = tuple(RECORDERS)
        info = PassInfo(st.chunk_index, kind, step, (self.p0, self.p1), self.labels(), st.bank_frames, T) \
            if observers else None

        def pieces(group, l, k, v):
            out = []
            for kind_, val in group:
                if kind_ == "cur":
                    out.append((k[:, val * T:(val + 1) * T], v[:, val * T:(val + 1) * T]))
                elif kind_ == "cache":
                    out.append((val[l, 0], val[l, 1]))
                else:
                    out.append((k.new_zeros(k.shape[0], T, *k.shape[2:]),) * 2)
            return out

        def cat(ps, i):
            return ps[0][i] if len(ps) == 1 else torch.cat([p[i] for p in ps], dim=1)

        def attend(l, q, k, v, need_output):
            if record is not None:
                record.append((k, v))
            if not need_output:
                return None
            if self.ws is not None:
                if self.ws is False:
                    self.ws = self._workspace(k)
                return self.attend_workspace(self.ws, l, q, k, v, observers, info)
            else:
                glob = pieces(self.sink, l, k, v) + pieces(self.bank, l, k, v)
                loc = pieces(self.local, l, k, v)
                if self.sma:
                    kg, vg, sel = mem.sma_select(q, cat(glob, 0), cat(glob, 1), T, st.stream.sma_top_k)
                    if loc:
                        kg = torch.cat([kg, cat(loc, 0).transpose(1, 2)], dim=2)
                        vg = torch.cat([vg, cat(loc, 1).transpose(1, 2)], dim=2)
                    for ob in observers:
                        ob.self_attention(info, l, q, kg, sma_frames=sel)
                    return _sdpa_bhld(q.transpose(1, 2), kg, vg).transpose(1, 2)
                ps = glob + loc
                keys, values = cat(ps, 0), cat(ps, 1)
            for ob in observers:
                ob.self_attention(info, l, q, keys.transpose(1, 2))
            return sdpa(q, keys, values)

        return attend

    def attend_workspace(self, ws, l, q, k, v, observers=(), info=None):
        """Attention with the context in workspace `ws` [L, 2, B, >= n_pre + n_cur, H, D]."""
        a, b = self.cur
        end = self.n_pre + b - a
        ws[l, 0, :, self.n_pre:end] = k[:, a:b]
        ws[l, 1, :, self.n_pre:end] = v[:, a:b]
        keys, values = ws[l, 0, :, :end], ws[l, 1, :, :end]
        if self.sma:
            g = self.n_glob * self.T
            kg, vg, sel = mem.sma_select(q, keys[:, :g], values[:, :g], self.T, self.state.stream.sma_top_k)
            kg = torch.cat([kg, keys[:, g:].transpose(1, 2)], dim=2)
            vg = torch.cat([vg, values[:, g:].transpose(1, 2)], dim=2)
            for ob in observers:
                ob.self_attention(info, l, q, kg, sma_frames=sel)
            return _sdpa_bhld(q.transpose(1, 2), kg, vg).transpose(1, 2)
        for ob in observers:
            ob.self_attention(info, l, q, keys.transpose(1, 2))
        return sdpa(q, keys, values)


def _sdpa_bhld(q, k, v):
    """SDPA on [B, H, L, D] tensors through the model's kernel preference."""
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _clean_pass(model, state: State, x0: torch.Tensor, ctx: _Context, kind: str) -> KV:
    """Run x0 at t = context_noise and return this pass's keys/values [L, 2, B, f*T, H, D]."""
    B, f = x0.shape[:2]
    rec: list = []
    t = torch.full((B, f), float(state.stream.context_noise), device=state.device, dtype=torch.float32)
    model(x0, t, state.text_kv, ctx.rope_start, ctx.attend_fn(kind, -1, record=rec), need_output=False)
    return torch.stack([torch.stack(kv) for kv in rec])


def _rotate_kv(kv: KV, delta) -> KV:
    """kv [L, 2, B, T, H, D] with its keys moved by delta frames (scalar or [L, B])."""
    from .model import rotate_time

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

    bank = tuple(_rotate_kv(slot, moved(state.bank_frames[:, :, j])) for j, slot in enumerate(state.bank))
    pending = state.pending
    if pending is not None:
        pending = _rotate_kv(pending, int(moved(torch.tensor(state.pending_frame))))
    return dataclasses.replace(state, cache=cache, bank=bank, pending=pending, pos_offset=new)


def _merge_cache(state: State, new_kv: KV, p0: int, p1: int, recompute: bool):
    """Cache after writing frames [p0, p1): the sink and the last `prev_frames` frames before p1."""
    sc, T = state.stream, state.tokens_per_frame
    frames = dict(state.cache)
    for f in range(p0, p1):
        # A re-cache never rewrites the sink slots (the official code protects them).
        if recompute and f < p0 + sc.sink_size:
            continue
        j = f - p0
        frames[f] = new_kv[:, :, :, j * T:(j + 1) * T]
    keep_from = p1 - sc.prev_frames
    return tuple(sorted((f, kv) for f, kv in frames.items() if f < sc.sink_size or f >= keep_from))


def _commit_chunk(state: State, new_kv: KV, x0: torch.Tensor) -> State:
    sc, T = state.stream, state.tokens_per_frame
    p0, n = state.position, x0.shape[1]
    c = state.chunk_index
    upd = {}
    if sc.bank_size > 0 and c % sc.record_interval == 0:
        # The chunk's first latent frame becomes the prototype that enters the bank next chunk.
        upd.update(pending=new_kv[:, :, :, :T].clone(), pending_frame=p0, n_records=c // sc.record_interval + 1)
        records = state.records + ((p0, x0[:, 0]),)
    else:
        records = state.records
    hist = torch.cat([state.history, x0], dim=1)[:, -sc.local_attn_size:]
    new = dataclasses.replace(state, cache=_merge_cache(state, new_kv, p0, p0 + n, recompute=False),
                              position=p0 + n, history=hist, **upd)
    return dataclasses.replace(new, records=_live_records(records, new.bank_frames, new.pending_frame))


def _live_records(records, frames: torch.Tensor, pending_frame: int):
    live = set(frames.unique().tolist()) | {pending_frame}
    return tuple((f, x) for f, x in records if f in live)


def state_to(state: State, device) -> State:
    """The same state with every tensor on `device` (tensors shared inside the state stay shared).

    Small index tensors (bank frames and scores) stay on the CPU.
    """
    device = torch.device(device)
    memo: dict[int, torch.Tensor] = {}

    def mv(t):
        if t is None or t.device == device:
            return t
        if id(t) not in memo:
            memo[id(t)] = t.to(device, non_blocking=device.type == "cpu" and t.is_cuda)
        return memo[id(t)]

    new = dataclasses.replace(
        state, prompt_embeds=mv(state.prompt_embeds), text_kv=mv(state.text_kv),
        cache=tuple((f, mv(kv)) for f, kv in state.cache), bank=tuple(mv(s) for s in state.bank),
        pending=mv(state.pending), history=mv(state.history), records=tuple((f, mv(x)) for f, x in state.records))
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return new

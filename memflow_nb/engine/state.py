"""The stream state: everything a stream carries between chunks.

A `State` is immutable by convention: every engine function returns a new State and never writes
into a tensor the old one holds. New states share unchanged tensors with old ones (structural
sharing), so keeping old states around (fork / resume) costs only what changed, and stepping
twice from the same state gives the same result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import ModelConfig, StreamConfig
from .masks import Ablation
from .memory import Bank, MemoryEvent

KV = torch.Tensor  # [L, 2, B, T * frames, H, D]

# Bank refreshes kept in State.memory_log; older ones are dropped so endless streams stay flat
# in memory (an inspection recording keeps every event).
MEMORY_LOG_MAX = 512


def _bank_field(name: str, doc: str) -> property:
    return property(lambda state: getattr(state.memory, name), doc=doc)


@dataclass(frozen=True, eq=False)
class State:
    """Everything a stream carries between chunks. Treat every tensor as read-only.

    Shapes: L layers, B batch, T tokens per latent frame, H heads, D head dim, C latent channels.
    The memory bank is one record, `memory`; `bank`, `bank_frames`, `bank_scores`, `pending`,
    `pending_frame`, `n_records` and `records` read its fields. `ablations` are attention masks
    on the bank or the sink (memflow_nb.interventions.ablate).
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
    memory: Bank
    history: torch.Tensor  # [B, n <= local_attn_size, C, h, w] clean latents of the last frames
    memory_log: tuple[MemoryEvent, ...]  # the last MEMORY_LOG_MAX bank refreshes
    pos_offset: int = 0  # RoPE position = frame - pos_offset (see memflow_nb.engine.steps)
    ablations: tuple[Ablation, ...] = ()  # attention masks on the bank / sink (memflow_nb.interventions)

    # The bank's fields, read through the state (read-only).
    bank = _bank_field("slots", "Bank slots, kv [L, 2, B, T, H, D] each.")
    bank_frames = _bank_field("frames", "[L, B, n_slots] long: source latent frame of each slot.")
    bank_scores = _bank_field("scores", "[L, B, n_slots] float32: last NAM score of each slot (nan: not scored yet).")
    pending = _bank_field("pending", "The newest record [L, 2, B, T, H, D] (or None); it enters at the next refresh.")
    pending_frame = _bank_field("pending_frame", "Source frame of the pending record (-1: none).")
    n_records = _bank_field("n_records", "Records made so far (the official bank pointer).")
    records = _bank_field("records", "(frame, clean latents [B, C, h, w]) of the frames in the bank or pending.")

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
        tensors = [self.prompt_embeds, self.text_kv, self.history, *(t for _, t in self.cache), *self.memory.tensors()]
        for t in tensors:
            st = t.untyped_storage()
            key = (st.data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        return total


def state_to(state: State, device, move=None) -> State:
    """The same state with every tensor on `device` (tensors shared inside the state stay shared).

    Small index tensors (bank frames and scores) stay on the CPU. ``move(tensor) -> tensor on
    device`` replaces ``Tensor.to`` (the caller then owns synchronisation).
    """
    device = torch.device(device)
    memo: dict[int, torch.Tensor] = {}

    def mv(t):
        if t is None or t.device == device:
            return t
        if id(t) not in memo:
            memo[id(t)] = move(t) if move is not None else t.to(device, non_blocking=device.type == "cpu" and t.is_cuda)
        return memo[id(t)]

    bank = state.memory
    memory = dataclasses.replace(bank, slots=tuple(mv(s) for s in bank.slots), pending=mv(bank.pending),
                                 records=tuple((f, mv(x)) for f, x in bank.records))
    new = dataclasses.replace(
        state, prompt_embeds=mv(state.prompt_embeds), text_kv=mv(state.text_kv),
        cache=tuple((f, mv(kv)) for f, kv in state.cache), memory=memory, history=mv(state.history))
    if move is None and device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return new

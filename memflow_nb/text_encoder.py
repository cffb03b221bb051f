"""umT5-XXL text encoder and a per-prompt embedding cache (the tokenizer: `memflow_nb.tokenizer`).

MemFlow conditions the DiT on the encoder output of umT5-XXL (the encoder half of T5 v1.1 with
per-layer relative position tables). Parameter names equal the Wan2.1 checkpoint
`models_t5_umt5-xxl-enc-bf16.pth`, so its state dict loads with `strict=True`.

    cfg = T5Config.from_name("umt5-xxl")
    encoder = UMT5Encoder.from_state_dict(state_dict, cfg, dtype=torch.bfloat16)
    tokenizer = Tokenizer("Wan2.1-T2V-1.3B/google/umt5-xxl")
    prompts = PromptEncoder(encoder, tokenizer, device="cuda", trim=True)
    emb = prompts(["a cat on a skateboard"])     # [1, 512, 4096], rows after </s> are 0
    prompts.offload()                             # free the 11 GB on the GPU

Where the encoder lives (GPU, streamed block by block from its file, CPU): `memflow_nb.weights.text`;
its files (Wan's bf16 `.pth`, the fp8 `.safetensors`): `memflow_nb.weights.text_file`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .tokenizer import Tokenizer, clean_text  # re-exported: they belong to this encoder

__all__ = [
    "T5Config",
    "T5_PRESETS",
    "UMT5Encoder",
    "relative_position_buckets",
    "run_stack",
    "clean_text",
    "Tokenizer",
    "encode_prompts",
    "PromptEncoder",
]


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder (field names follow Wan's `T5Encoder` arguments)."""

    vocab: int
    dim: int
    dim_attn: int  # width of q/k/v (heads x head_dim); T5 lets it differ from dim
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int  # relative position buckets, split evenly between the two directions
    max_distance: int = 128  # distances at or past this share the last bucket
    eps: float = 1e-6
    shared_pos: bool = False  # umT5: False, one position table per block

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"T5Config.dim_attn={self.dim_attn} is not divisible by num_heads={self.num_heads}")
        # Bidirectional bucketing halves the buckets, then half of each half is exact distances.
        if self.num_buckets % 4 or self.num_buckets < 4:
            raise ValueError(f"T5Config.num_buckets={self.num_buckets} must be a positive multiple of 4")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"T5Config.max_distance={self.max_distance} must exceed num_buckets/4")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_name(cls, name: str) -> "T5Config":
        """A named preset: 'umt5-xxl' (Wan2.1's text encoder)."""
        try:
            return T5_PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown T5 preset {name!r}; known: {sorted(T5_PRESETS)}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        """Build from a Wan-style kwargs dict, e.g. the golden file's `meta["config"]`.

        Keys that are not fields (dropout, ...) are ignored; `max_dist` is read as max_distance.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "max_dist" in d and "max_distance" not in kw:
            kw["max_distance"] = d["max_dist"]
        return cls(**kw)


T5_PRESETS = {
    "umt5-xxl": T5Config(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64,
                         num_layers=24, num_buckets=32),
}


# --------------------------------------------------------------------------------------------
# Model


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | str | None = None) -> Tensor:
    """Bidirectional T5 bucket of every (query, key) pair: int64 [length, length].

    Half the buckets are for keys after the query, half for keys at or before it. Within a half,
    the first quarter of num_buckets are exact distances; the rest are log-spaced up to
    max_distance, past which everything shares the last bucket.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key minus query
    half = num_buckets // 2
    exact = half // 2
    side = (rel > 0).long() * half
    dist = rel.abs()
    # Computed in float32 in this exact order, as the reference does, so that distances landing
    # on a bucket edge (16, 32, 64) round the same way. clamp(1) only avoids log(0); those
    # entries take the exact branch anyway.
    far = exact + (torch.log(dist.clamp(min=1).float() / exact)
                   / math.log(max_distance / exact) * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return side + torch.where(dist < exact, dist, far)


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in fp32: a bf16 mean of squares over 4096 channels is too coarse.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, dim], bias [B or 1, H, L, L] (position + key padding) -> [B, L, dim]."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        # No 1/sqrt(head_dim): T5 folds that factor into the trained q weights.
        scores = q @ k.transpose(-1, -2) + bias
        probs = scores.float().softmax(-1).to(v.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return self.o(out)


class FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        # A Sequential only so the checkpoint name `gate.0.weight` matches.
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativeBias(nn.Module):
    """Learned bias per (bucket, head); named `pos_embedding.embedding` in the checkpoint."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, buckets: Tensor) -> Tensor:
        """buckets int64 [L, L] -> bias [1, H, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _clamp_fp16(x: Tensor) -> Tensor:
    """Wan's T5 fp16 guard: once a residual sum has overflowed to inf somewhere, clamp the whole
    tensor to +-(fp16 max - 1000); otherwise leave it as is. No-op for fp32 and bf16.

    umT5 activations outgrow the fp16 range; Wan applies this after both residual adds of every
    block (`T5SelfAttention.forward`), and so does `Block` here. `torch.where` instead of Wan's
    Python `if` keeps it free of a GPU->CPU sync; the values are the same.
    """
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-big, big), x)


class Block(nn.Module):
    """Pre-norm self-attention then feed-forward, each with a residual."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = None if cfg.shared_pos else RelativeBias(cfg)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack. Build on the meta device and load with `assign=True`.

    No buffers: position buckets are computed in `forward`, so the state dict holds exactly the
    checkpoint's tensors (242 for umT5-XXL).
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos_embedding = RelativeBias(cfg) if cfg.shared_pos else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.eval()  # inference only: the reference's dropout is off in eval, so there is none here

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], cfg: T5Config | None = None, *,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> "UMT5Encoder":
        """Wrap a checkpoint state dict without a second copy of the weights.

        cfg defaults to umT5-XXL. With dtype, the tensors are cast first (bf16 halves fp32 memory).
        Returns an eval-mode encoder with requires_grad off, on `device` (default: where the
        tensors are).
        """
        cfg = cfg or T5Config.from_name("umt5-xxl")
        with torch.device("meta"):
            model = cls(cfg)
        if dtype is not None:
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.requires_grad_(False).eval()
        return model if device is None else model.to(device)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids int64 [B, L], mask [B, L] (nonzero = real token) -> hidden [B, L, dim].

        Padded positions are still computed (they are zeroed later by `encode_prompts`); they are
        only hidden as keys.
        """
        return run_stack(self.cfg, [self.token_embedding(ids)], [mask], self.blocks.__getitem__,
                         self.pos_embedding, self.norm)[0]

    def forward_each(self, ids: list[Tensor]) -> list[Tensor]:
        """Unpadded prompts, each at its own length: ids [1, n_i] -> hidden [1, n_i, dim] each."""
        return run_stack(self.cfg, [self.token_embedding(i) for i in ids], [None] * len(ids),
                         self.blocks.__getitem__, self.pos_embedding, self.norm)


def run_stack(cfg: T5Config, xs: list[Tensor], masks: list[Tensor | None], block_at,
              shared_pos: RelativeBias | None, norm: RMSNorm) -> list[Tensor]:
    """The encoder after its token embedding, over several sequences: xs [B_j, L_j, dim] with
    masks [B_j, L_j] (or None: every position real) -> hidden [B_j, L_j, dim] each.

    block_at(i) returns block i: the resident encoder's own module, or one a streamed encoder
    has just made from its file, so both run exactly the same operations. Each block is applied
    to every sequence, then dropped before the next one is asked for: a streamed encoder holds
    one block at a time however many prompts it encodes.
    """
    prep = []
    for x, mask in zip(xs, masks):
        buckets = relative_position_buckets(x.shape[1], cfg.num_buckets, cfg.max_distance, x.device)
        # finfo.min rather than -inf so that a row with every key padded gives a uniform
        # softmax instead of NaN.
        key_pad = None if mask is None else (mask == 0)[:, None, None, :]  # [B, 1, 1, L]
        prep.append((buckets, key_pad, shared_pos(buckets) if cfg.shared_pos else None))
    xs = list(xs)
    for i in range(cfg.num_layers):
        block = block_at(i)
        for j, (buckets, key_pad, shared) in enumerate(prep):
            x = xs[j]
            bias = (shared if cfg.shared_pos else block.pos_embedding(buckets)).to(x.dtype)
            if key_pad is not None:
                bias = bias.masked_fill(key_pad, torch.finfo(x.dtype).min)
            xs[j] = block(x, bias)
            del x, bias
        del block
    return [norm(x) for x in xs]


# The per-prompt cache and batch encoding live beside the model; re-exported for existing imports.
from .prompt_encoder import PromptEncoder, encode_prompts  # noqa: E402

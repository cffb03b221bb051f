"""The causal Wan2.1 DiT with Wan2.1 parameter names.

The module only does the math of one forward pass over a chunk of latent frames. Everything
about the streaming context (KV cache, sink, memory bank) lives in `context.py` and `steps.py`:
attention calls back into an `Attention` object that the caller provides, so the model has no
hidden state and the same weights serve the engine, the test oracles, inspection and the
compiled wrapper of `memflow_nb.fast` (which passes its compiled block pieces to `forward`).
"""
from __future__ import annotations

import math
import uuid
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from einops import rearrange

from .config import ModelConfig
from .observers import ObserverBindings

# attend(layer, q, k, v, need_output) -> out [B, L, H, D] or None; q, k are already rotated.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], Optional[torch.Tensor]]


class Attention:
    """The model's one seam: self-attention over the streaming context and cross-attention to the text.

    Subclasses implement `__call__` (an `AttendFn`); `cross` defaults to plain softmax attention
    with the SDPA kernel order `backends` (None: PyTorch's choice). A bare `AttendFn` function is
    accepted too (its cross-attention is the plain one).
    """

    backends = None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 need_output: bool) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def cross(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Lq, H, D] against the text keys/values k, v [B, Ltxt, H, D] -> [B, Lq, H, D]."""
        return sdpa(q, k, v, self.backends)


# One block's three pieces around its two attention calls: qkv -> self-attention -> self_out ->
# cross-attention -> finish. `memflow_nb.fast` compiles them; attention stays between them.
BlockPieces = tuple[Callable, Callable, Callable]


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in fp32, cast back, then scale by the learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free LayerNorm over the last dim (Wan's norm1 / norm2 / head.norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class AttentionProjections(nn.Module):
    """q, k, v, o projections with RMS-normed q and k: Wan's self_attn and cross_attn parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = AttentionProjections(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = AttentionProjections(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))

    def qkv(self, x, e0, rope):
        """Modulated norm and rotated q, k, v: x [B, f, T, dim] -> q, k, v [B, f*T, H, D]."""
        cfg = self.cfg
        H = cfg.num_heads
        # Per-frame adaLN: each latent frame has its own timestep embedding.
        shift1, scale1 = (self.modulation[:, :2].unsqueeze(1) + e0[:, :, :2]).chunk(2, dim=2)
        h = layer_norm(x, cfg.eps) * (1 + scale1) + shift1
        sa = self.self_attn
        q = apply_rope(split_heads(sa.norm_q(sa.q(h)), H), rope)
        k = apply_rope(split_heads(sa.norm_k(sa.k(h)), H), rope)
        return q, k, split_heads(sa.v(h), H)

    def self_out(self, x, y, e0):
        """After self-attention output y [B, f*T, H, D]: (x [B, f, T, dim], cross queries [B, f*T, H, D])."""
        f = x.shape[1]
        gate1 = self.modulation[:, 2:3].unsqueeze(1) + e0[:, :, 2:3]
        x = x + self.self_attn.o(merge_heads(y, f)) * gate1
        # Cross-attention: no gate, no modulation; text K/V come precomputed (once per prompt).
        ca = self.cross_attn
        return x, split_heads(ca.norm_q(ca.q(self.norm3(x))), self.cfg.num_heads)

    def finish(self, x, c, e0):
        """After cross-attention output c [B, f*T, H, D]: the FFN; returns x [B, f, T, dim]."""
        shift2, scale2, gate2 = (self.modulation[:, 3:].unsqueeze(1) + e0[:, :, 3:]).chunk(3, dim=2)
        x = x + self.cross_attn.o(merge_heads(c, x.shape[1]))
        return x + self.ffn(layer_norm(x, self.cfg.eps) * (1 + scale2) + shift2) * gate2

    def pieces(self) -> BlockPieces:
        return self.qkv, self.self_out, self.finish

    def forward(self, x, e0, rope, text_k, text_v, attend, layer: int, need_output: bool = True,
                pieces: Optional[BlockPieces] = None):
        """x [B, f, T, dim] (T tokens per frame), e0 [B, f, 6, dim], text_k/v [B, Ltxt, H, D].

        attend: an `Attention` (or a bare `AttendFn`); pieces: this block's (qkv, self_out, finish),
        e.g. compiled ones, in place of its own methods.
        """
        qkv, self_out, finish = pieces or self.pieces()
        q, k, v = qkv(x, e0, rope)
        y = attend(layer, q, k, v, need_output)
        if not need_output:
            return None
        x, cq = self_out(x, y, e0)
        cross = attend.cross if isinstance(attend, Attention) else _plain_cross
        return finish(x, cross(layer, cq, text_k, text_v), e0)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x, e):
        """x [B, f, T, dim], e [B, f, 1, dim] (the 1-D time embedding, not e0)."""
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(layer_norm(x, self.cfg.eps) * (1 + scale) + shift)


class CausalWanModel(nn.Module):
    """Causal Wan2.1 text-to-video DiT. `state_dict()` uses the Wan2.1 names.

    The plain model runs eagerly with PyTorch's attention kernel choice; `memflow_nb.fast` wraps
    it with compiled pieces, CUDA graphs and a kernel order (the two declared policies below).
    """

    attention_backends = None  # SDPA kernel order for the engine's attention (None: PyTorch's choice)
    graphs = None  # CUDA-graph pass runner (memflow_nb.fast.graphs); none for the plain model

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # A per-instance id lets the stream refuse states made with another model.
        self.instance_id = uuid.uuid4().hex
        self.observers = ObserverBindings()  # observers bound to this model, per thread (observers.py)
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    # -- pieces -------------------------------------------------------------------------------
    def text_kv(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Cross-attention keys/values of every layer for one prompt.

        prompt_embeds [B, Ltxt <= text_len, text_dim] -> [num_layers, 2, B, text_len, H, D].
        Rows past Ltxt are zero-padded first (as the official code does), so the padding rows
        become text_embedding(0), not zero.
        """
        cfg = self.cfg
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be [B, L, {cfg.text_dim}] (text_dim of this model), "
                             f"got {list(prompt_embeds.shape)}")
        B, L, _ = prompt_embeds.shape
        if L > cfg.text_len:
            raise ValueError(f"prompt_embeds has {L} tokens, more than text_len={cfg.text_len}")
        w = self.text_embedding[0].weight
        ctx = prompt_embeds.to(w.device, w.dtype)
        if L < cfg.text_len:
            ctx = torch.cat([ctx, ctx.new_zeros(B, cfg.text_len - L, cfg.text_dim)], dim=1)
        ctx = self.text_embedding(ctx)
        H = cfg.num_heads
        out = []
        for blk in self.blocks:
            ca = blk.cross_attn
            out.append(torch.stack([split_heads(ca.norm_k(ca.k(ctx)), H), split_heads(ca.v(ctx), H)]))
        return torch.stack(out)

    def time_embed(self, t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, f] -> (e [B, f, 1, dim], e0 [B, f, 6, dim])."""
        B, f = t.shape
        e = self.time_embedding(sinusoidal_embedding(t.reshape(-1), self.cfg.freq_dim).to(dtype))
        e0 = self.time_projection(e).view(B, f, 6, self.cfg.dim)
        return e.view(B, f, 1, self.cfg.dim), e0

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, f, C, h, w] -> tokens [B, f, T, dim] in (row, col) raster order."""
        y = self.patch_embedding(x.transpose(1, 2))
        return rearrange(y, "b dim f gh gw -> b f (gh gw) dim")

    def unpatchify(self, y: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Head output [B, f, T, prod(patch) * out] -> [B, f * pt, out, gh * ph, gw * pw]."""
        pt, ph, pw = self.cfg.patch_size
        return rearrange(y, "b f (gh gw) (pt ph pw c) -> b (f pt) c (gh ph) (gw pw)", gh=gh, gw=gw, pt=pt, ph=ph,
                         pw=pw)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text_kv: torch.Tensor, frame_start: int,
                attend, need_output: bool = True, rope=None,
                pieces: Optional[Sequence[BlockPieces]] = None) -> Optional[torch.Tensor]:
        """One pass over a chunk.

        Args:
            x: latents [B, f, C, h, w] (h, w divisible by the patch size).
            t: timesteps [B, f] (float; one per latent frame).
            text_kv: [num_layers, 2, B, text_len, H, D] from `text_kv`.
            frame_start: absolute stream index of x's first latent frame (temporal RoPE position).
            attend: an `Attention` (self-attention over the streaming context, cross-attention to
                the text), or a bare `AttendFn` for self-attention only.
            need_output: False for the clean pass that only writes the cache: the last layer stops
                after its keys/values and the head is skipped (returns None).
            rope: precomputed (cos, sin) from `rope_cos_sin` (CUDA-graph replays pass static ones).
            pieces: per block, (qkv, self_out, finish) to run in place of the block's own methods.
        Returns:
            the flow prediction (noise - x0) [B, f, C_out, h, w], or None.
        """
        cfg = self.cfg
        B, f, C, h, w = x.shape
        _, ph, pw = cfg.patch_size
        if C != cfg.in_dim:
            raise ValueError(f"latents have {C} channels, the model expects in_dim={cfg.in_dim}")
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        gh, gw = h // ph, w // pw
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patchify(x.to(dtype))
        e, e0 = self.time_embed(t, dtype)
        if rope is None:
            rope = rope_cos_sin(cfg.head_dim, frame_start, f, gh, gw, tokens.device)
        last = cfg.num_layers - 1
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, e0, rope, text_kv[i, 0], text_kv[i, 1], attend, i,
                         need_output or i < last, pieces[i] if pieces is not None else None)
        if not need_output:
            return None
        return self.unpatchify(self.head(tokens, e), gh, gw)


# -- functional helpers -------------------------------------------------------------------------

def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, f, T, H * D] or [B, L, H * D] -> [B, f * T, H, D] / [B, L, H, D]."""
    if x.dim() == 4:
        return rearrange(x, "b f t (h d) -> b (f t) h d", h=heads)
    return rearrange(x, "b l (h d) -> b l h d", h=heads)


def merge_heads(y: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, f * T, H, D] -> [B, f, T, H * D]."""
    return rearrange(y, "b (f t) h d -> b f t (h d)", f=frames)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends=None,
         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain softmax attention, scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    backends: SDPA kernels to try first, in order (a list of `torch.nn.attention.SDPBackend`,
    CUDA only); None leaves the choice to PyTorch. bias: additive logits [B, H, 1, Lk] (a mask).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backends is None or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


def _plain_cross(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return sdpa(q, k, v)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep features [N] -> [N, dim]: cos half then sin half, computed in float64."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(t, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (time, height, width); 22/21/21 for head_dim 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(pos: torch.Tensor, pairs: int) -> torch.Tensor:
    # theta_j = 10000^(-2j / (2 * pairs)), exactly Wan's rope_params table, in float64.
    inv = 1.0 / torch.pow(10000.0, torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=pos.device) / (2 * pairs))
    return torch.outer(pos.to(torch.float64), inv)


def rope_cos_sin(head_dim: int, frame_start: int, f: int, gh: int, gw: int, device,
                 frame_positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [f * gh * gw, head_dim // 2] (float32) for tokens at absolute frames frame_start..+f."""
    nt, nh, nw = rope_split(head_dim)
    if frame_positions is None:
        frame_positions = torch.arange(frame_start, frame_start + f, device=device)
    at = _axis_angles(frame_positions, nt)[:, None, None, :].expand(f, gh, gw, nt)
    ah = _axis_angles(torch.arange(gh, device=device), nh)[None, :, None, :].expand(f, gh, gw, nh)
    aw = _axis_angles(torch.arange(gw, device=device), nw)[None, None, :, :].expand(f, gh, gw, nw)
    ang = torch.cat([at, ah, aw], dim=-1).reshape(f * gh * gw, nt + nh + nw)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rotate_time(k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Move already-rotated keys k [..., T, H, D] by `delta` latent frames in time.

    RoPE rotations compose, so rotating by delta*theta re-bases a stored key from position p to
    p + delta exactly (up to rounding); the height/width pairs are untouched. delta broadcasts
    against k.shape[:-1] (a scalar, or e.g. [L, B, 1, 1] for keys [L, B, T, H, D]).
    """
    D = k.shape[-1]
    nt, _, _ = rope_split(D)
    ang = delta.to(torch.float64)[..., None] * _axis_angles(torch.ones(1, device=k.device), nt)[0]  # [..., nt]
    cos = torch.ones(*ang.shape[:-1], D // 2, dtype=torch.float64, device=k.device)
    sin = torch.zeros_like(cos)
    cos[..., :nt], sin[..., :nt] = torch.cos(ang), torch.sin(ang)
    kf = k.float().unflatten(-1, (-1, 2))
    re, im = kf[..., 0], kf[..., 1]
    cos, sin = cos.float(), sin.float()
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).type_as(k)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, L, H, D] by the per-token angles."""
    cos, sin = rope
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).type_as(x)

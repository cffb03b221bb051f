"""The causal Wan2.1 DiT with Wan2.1 parameter names.

The module only does the math of one forward pass over a chunk of latent frames. Everything
about the streaming context (KV cache, sink, memory bank) lives in `stream.py`: self-attention
calls back into an `attend(layer, q, k, v)` function that the caller provides, so the model has
no hidden state and the same weights serve the fast path, the reference path and inspection.
"""
from __future__ import annotations

import math
import uuid
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# Cross-attention observers (memflow_nb.inspect); empty unless a recording is active.
CROSS_OBSERVERS: list = []

# attend(layer, q, k, v, need_output) -> out [B, L, H, D] or None; q, k are already rotated.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], Optional[torch.Tensor]]


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
        self.compiled = None  # (qkv, finish) compiled by `compile_model`
        self.layer_index = -1

    def qkv(self, x, e0, rope):
        """Modulated norm and rotated q, k, v: x [B, f, T, dim] -> q, k, v [B, f*T, H, D]."""
        cfg = self.cfg
        B, f, T, _ = x.shape
        H, D = cfg.num_heads, cfg.head_dim
        # Per-frame adaLN: each latent frame has its own timestep embedding.
        shift1, scale1 = (self.modulation[:, :2].unsqueeze(1) + e0[:, :, :2]).chunk(2, dim=2)
        h = layer_norm(x, cfg.eps) * (1 + scale1) + shift1
        sa = self.self_attn
        q = apply_rope(sa.norm_q(sa.q(h)).view(B, f * T, H, D), rope)
        k = apply_rope(sa.norm_k(sa.k(h)).view(B, f * T, H, D), rope)
        return q, k, sa.v(h).view(B, f * T, H, D)

    def finish(self, x, y, e0, text_k, text_v):
        """The rest of the block after self-attention output y [B, f*T, H, D]."""
        cfg = self.cfg
        B, f, T, _ = x.shape
        H, D = cfg.num_heads, cfg.head_dim
        gate1, shift2, scale2, gate2 = (self.modulation[:, 2:].unsqueeze(1) + e0[:, :, 2:]).chunk(4, dim=2)
        x = x + self.self_attn.o(y.reshape(B, f, T, cfg.dim)) * gate1
        # Cross-attention: no gate, no modulation; text K/V come precomputed (once per prompt).
        ca = self.cross_attn
        cq = ca.norm_q(ca.q(self.norm3(x))).view(B, f * T, H, D)
        for ob in tuple(CROSS_OBSERVERS):
            ob.cross_attention(self.layer_index, cq, text_k)
        c = sdpa(cq, text_k, text_v)
        x = x + ca.o(c.reshape(B, f, T, cfg.dim))
        return x + self.ffn(layer_norm(x, cfg.eps) * (1 + scale2) + shift2) * gate2

    def forward(self, x, e0, rope, text_k, text_v, attend: AttendFn, layer: int, need_output: bool = True):
        """x [B, f, T, dim] (T tokens per frame), e0 [B, f, 6, dim], text_k/v [B, Ltxt, H, D]."""
        self.layer_index = layer
        qkv, finish = (self.qkv, self.finish) if self.compiled is None else self.compiled
        if CROSS_OBSERVERS:  # inspection runs eager, so observers always see every call
            finish = self.finish
        q, k, v = qkv(x, e0, rope)
        y = attend(layer, q, k, v, need_output)
        if not need_output:
            return None
        return finish(x, y, e0, text_k, text_v)


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
    """Causal Wan2.1 text-to-video DiT. `state_dict()` uses the Wan2.1 names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # A per-instance id lets the stream refuse states made with another model.
        self.instance_id = uuid.uuid4().hex
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
        H, D = cfg.num_heads, cfg.head_dim
        out = []
        for blk in self.blocks:
            ca = blk.cross_attn
            out.append(torch.stack([ca.norm_k(ca.k(ctx)).view(B, -1, H, D), ca.v(ctx).view(B, -1, H, D)]))
        return torch.stack(out)

    def time_embed(self, t: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, f] -> (e [B, f, 1, dim], e0 [B, f, 6, dim])."""
        B, f = t.shape
        e = self.time_embedding(sinusoidal_embedding(t.reshape(-1), self.cfg.freq_dim).to(dtype))
        e0 = self.time_projection(e).view(B, f, 6, self.cfg.dim)
        return e.view(B, f, 1, self.cfg.dim), e0

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, f, C, h, w] -> tokens [B, f, T, dim] in (row, col) raster order."""
        y = self.patch_embedding(x.transpose(1, 2))  # [B, dim, f, gh, gw]
        return y.flatten(3).permute(0, 2, 3, 1)

    def unpatchify(self, y: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Head output [B, f, T, prod(patch) * out] -> [B, f * pt, out, gh * ph, gw * pw]."""
        pt, ph, pw = self.cfg.patch_size
        B, f = y.shape[:2]
        y = y.view(B, f, gh, gw, pt, ph, pw, self.cfg.out_dim)
        y = y.permute(0, 1, 4, 7, 2, 5, 3, 6)  # B f pt c gh ph gw pw
        return y.reshape(B, f * pt, self.cfg.out_dim, gh * ph, gw * pw)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text_kv: torch.Tensor, frame_start: int,
                attend: AttendFn, need_output: bool = True, rope=None) -> Optional[torch.Tensor]:
        """One pass over a chunk.

        Args:
            x: latents [B, f, C, h, w] (h, w divisible by the patch size).
            t: timesteps [B, f] (float; one per latent frame).
            text_kv: [num_layers, 2, B, text_len, H, D] from `text_kv`.
            frame_start: absolute stream index of x's first latent frame (temporal RoPE position).
            attend: self-attention over the streaming context, see `AttendFn`.
            need_output: False for the clean pass that only writes the cache: the last layer stops
                after its keys/values and the head is skipped (returns None).
            rope: precomputed (cos, sin) from `rope_cos_sin` (CUDA-graph replays pass static ones).
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
                         need_output or i < last)
        if not need_output:
            return None
        return self.unpatchify(self.head(tokens, e), gh, gw)


def compile_model(model: CausalWanModel, **compile_kwargs) -> CausalWanModel:
    """Compile each block's two halves (before and after self-attention) with torch.compile.

    Attention itself stays eager between them, since its context comes from the stream. The same
    module object is returned; `uncompile_model` undoes it. Numbers match eager up to the usual
    floating-point reassociation of fused kernels.
    """
    kw = dict(dynamic=False)
    kw.update(compile_kwargs)
    for blk in model.blocks:
        blk.compiled = (torch.compile(blk.qkv, **kw), torch.compile(blk.finish, **kw))
    return model


def uncompile_model(model: CausalWanModel) -> CausalWanModel:
    for blk in model.blocks:
        blk.compiled = None
    return model


# -- functional helpers -------------------------------------------------------------------------

# SDPA kernels to try first (e.g. cuDNN on Hopper), set by memflow_nb.speed; None: PyTorch's choice.
SDPA_BACKENDS = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, scale 1/sqrt(D). q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if SDPA_BACKENDS is None or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


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

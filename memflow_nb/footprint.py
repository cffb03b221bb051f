"""Bytes of each piece of a MemFlow stream, computed from the configs (no tensors allocated).

Every formula follows what the eager code keeps alive; the docstring of each says where from.
`memflow_nb.plan` adds them up per device and phase. At 480x832 in bf16 they give: DiT 1.42 B
params = 2.84 GB; umT5-XXL 5.68 B params = 11.4 GB; stream state 3.88 GB; attention workspace
15 frames = 4.31 GB; a chunk's peak above the state 6.07 GB; a prompt switch's 3.79 GB; VAE
decode caches 1.89 GB, decode peak 8.79 GB (6.38 per frame). Measured on an H200 (eager, bf16):
3.84, 1.89, 8.49 and 6.10 GB for the state, decode caches and decode peaks; the chunk (7.48 GB)
and switch (15.33 GB) were measured while the clean pass still held three copies of its keys
and values and the re-cache kept a whole workspace: these formulas follow today's code, checked
against the CPU allocator (tests/test_plan.py, within 3% from a 2-layer to a 30-layer model),
and `python -m memflow_nb.plan_check` measures them again on a GPU.

Notation: L layers, B batch, T tokens per latent frame, e bytes per element,
frame_kv = keys + values of one latent frame in every layer = 2 * L * B * T * dim * e.
"""
from __future__ import annotations

import functools
import math

import torch

from .engine.config import ModelConfig, StreamConfig
from .fast.fp8 import FP8_LINEARS
from .text_encoder import T5Config
from .decode.vae import VAEConfig

FP8_SCALE_BYTES = 4  # Float8Linear keeps one float32 scale per output row
CPU_IM2COL_BELOW = 24  # measured, torch 2.13 on x86: narrower CPU conv3d layers unfold (im2col)


def configs(name: str) -> tuple[ModelConfig, T5Config, VAEConfig]:
    """(DiT, text encoder, VAE) configs of a named pipeline: "memflow" or "tiny"."""
    if name == "memflow":
        return ModelConfig.from_name("wan2.1-t2v-1.3b"), T5Config.from_name("umt5-xxl"), VAEConfig()
    if name == "tiny":
        try:
            from .pipeline import TINY_T5, TINY_VAE, tiny_tokenizer
        except ImportError:  # before the hub -> pipeline rename
            from .pipeline import TINY_T5, TINY_VAE, tiny_tokenizer
        cfg = ModelConfig.from_name("tiny")
        return cfg, T5Config(vocab=tiny_tokenizer().get_vocab_size(), dim=cfg.text_dim, **TINY_T5), TINY_VAE
    raise ValueError(f"unknown pipeline {name!r}; known: 'memflow', 'tiny'")


# -- weights (parameter counts from the real modules, built on the meta device) --------------

@functools.lru_cache(maxsize=None)
def _meta_params(kind: str, cfg) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """(parameter count, fp8-able linears as (weight numel, out features, bias numel)) of a module."""
    from .engine.model import CausalWanModel
    from .text_encoder import UMT5Encoder
    from .decode.vae import WanVAEDecoder

    build = {"dit": CausalWanModel, "t5": UMT5Encoder, "vae": WanVAEDecoder}[kind]
    with torch.device("meta"):
        module = build(cfg)
    linears = ()
    if kind == "dit":
        mods = [blk.get_submodule(n) for blk in module.blocks for n in FP8_LINEARS]
        linears = tuple((m.weight.numel(), m.out_features, 0 if m.bias is None else m.bias.numel()) for m in mods)
    return sum(p.numel() for p in module.parameters()), linears


def dit_params(cfg: ModelConfig) -> int:
    return _meta_params("dit", cfg)[0]


def dit_weight_bytes(cfg: ModelConfig, elem: int, fp8: bool = False) -> int:
    """The DiT's weights; with fp8, the linears `fp8.to_fp8` converts take 1 byte per weight plus
    a float32 scale per output row (their biases and every other tensor stay in the dtype)."""
    total, linears = _meta_params("dit", cfg)
    if not fp8:
        return total * elem
    moved = sum(w for w, _, _ in linears)
    return (total - moved) * elem + sum(w + out * FP8_SCALE_BYTES for w, out, _ in linears)


def lora_params(cfg: ModelConfig, rank: int) -> int:
    """A LoRA of `rank` on every linear of every block (MemFlow's, merged at load): r * (in + out) each."""
    d, f = cfg.dim, cfg.ffn_dim
    per_block = 8 * rank * 2 * d + rank * (d + f) * 2  # self/cross q, k, v, o; ffn.0 and ffn.2
    return cfg.num_layers * per_block


def text_encoder_params(cfg: T5Config) -> int:
    return _meta_params("t5", cfg)[0]


def text_block_bytes(cfg: T5Config, elem: int) -> int:
    """One umT5 block: attention q, k, v, o + gated FFN (fc1, gate, fc2) + norms + position table."""
    attn = 4 * cfg.dim * cfg.dim_attn
    ffn = 3 * cfg.dim * cfg.dim_ffn
    return (attn + ffn + 2 * cfg.dim + (0 if cfg.shared_pos else cfg.num_buckets * cfg.num_heads)) * elem


def text_encode_bytes(cfg: T5Config, prompts: int, tokens: int, elem: int) -> int:
    """Activations of one encoder block over `prompts` x `tokens` (text_encoder.Block): the hidden
    state, its norm and residual (fp32 statistics), the FFN's fc1, gate and product; and per head
    [L, L]: the position bias with the padding mask, the scores, their float32 softmax and the
    probabilities. Measured 225 MB for one prompt of 512 tokens on umT5-XXL in bf16 (est. 216)."""
    hidden = prompts * tokens * (2 * cfg.dim * elem + cfg.dim * 4 + 3 * cfg.dim_ffn * elem)
    scores = prompts * cfg.num_heads * tokens * tokens * (3 * elem + 4)
    return hidden + scores


def vae_weight_bytes(cfg: VAEConfig, elem: int) -> int:
    return _meta_params("vae", cfg)[0] * elem


# -- the stream (stream.py) -------------------------------------------------------------------

def tokens_per_frame(cfg: ModelConfig, latent_hw: tuple[int, int]) -> int:
    _, ph, pw = cfg.patch_size
    return (latent_hw[0] // ph) * (latent_hw[1] // pw)


def frame_kv_bytes(cfg: ModelConfig, latent_hw, batch: int, elem: int) -> int:
    """Keys and values of one latent frame in every layer: 2 * L * B * T * dim * e."""
    return 2 * cfg.num_layers * batch * tokens_per_frame(cfg, latent_hw) * cfg.dim * elem


def _latent_frame_bytes(cfg: ModelConfig, latent_hw, batch: int, elem: int) -> int:
    return batch * cfg.in_dim * latent_hw[0] * latent_hw[1] * elem


def stream_state_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw, batch: int, elem: int,
                       prompt_tokens: int | None = None) -> int:
    """What `State.nbytes()` counts in the steady state, right after a chunk that made a record.

    Storage, not views, is what stays alive: a cached frame keeps its whole chunk's K/V tensor
    (stream._merge_cache slices it), so the sink keeps chunk 0's `chunk_frames` frames and the
    window keeps ceil(prev / chunk) whole chunks; bank slots and the pending record are 1-frame
    clones. history is a slice of cat(history, x0): local + chunk frames of storage; each record
    is x0[:, 0], a view that keeps its chunk's x0 alive, and a record lives while any layer's bank
    holds its frame: up to L x (bank - 1) kept frames, the pending one and a new one.
    """
    n = stream.chunk_frames
    whole = lambda frames: n * math.ceil(frames / n)  # noqa: E731  (frames -> whole chunks of storage)
    kv_frames = whole(stream.sink_size) + whole(stream.prev_frames)
    if stream.bank_size:
        kv_frames += stream.bank_size + 1  # slots + the pending record
    lat = _latent_frame_bytes(cfg, latent_hw, batch, elem)
    text_kv = 2 * cfg.num_layers * batch * cfg.text_len * cfg.dim * elem
    prompt = batch * (prompt_tokens or cfg.text_len) * cfg.text_dim * elem
    history = (stream.local_attn_size + n) * lat
    records = (cfg.num_layers * (stream.bank_size - 1) + 2) * n * lat if stream.bank_size else 0
    bank_index = cfg.num_layers * batch * stream.bank_size * (8 + 4)  # frames (int64) + scores (fp32)
    return kv_frames * frame_kv_bytes(cfg, latent_hw, batch, elem) + text_kv + prompt + history + records + bank_index


def workspace_frames(stream: StreamConfig) -> int:
    """Key frames in a chunk's attention workspace (stream._Context): sink + bank + window + chunk."""
    return stream.sink_size + stream.bank_size + stream.prev_frames + stream.chunk_frames


def _pass_bytes(cfg: ModelConfig, tokens: int, batch: int, elem: int) -> int:
    """One layer's activations at their peak in a pass over `tokens` tokens, the FFN of
    model.Block.finish: its two hidden tensors [tokens, ffn_dim] while ten [tokens, dim] ones are
    alive (the block input; q, k, v and the self-attention output, which Block.forward holds; the
    residual after self-attention, the cross-attention queries and output, the residual after it
    and the FFN input); plus the RoPE tables (2 x [tokens, head_dim/2] float32)."""
    n = batch * tokens
    return n * (10 * cfg.dim + 2 * cfg.ffn_dim) * elem + 2 * tokens * (cfg.head_dim // 2) * 4


def chunk_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw, batch: int, elem: int) -> dict[str, int]:
    """Extra bytes while `step` makes one chunk, above the state the caller holds.

    workspace: the attention context written once per chunk (context.Workspace).
    new_kv: the clean pass writes every layer's K/V of the chunk straight into one tensor of
        chunk_frames x frame_kv (steps._clean_pass, context.PassKV), made before its first layer,
        so one layer's activations come on top of it.
    compress: once the bank is full, the kept slots are gathered copies (memory.compress).
    latents: the noise and re-noise tensors of every step, x and x0.
    """
    n, fkv = stream.chunk_frames, frame_kv_bytes(cfg, latent_hw, batch, elem)
    T = tokens_per_frame(cfg, latent_hw)
    lat = _latent_frame_bytes(cfg, latent_hw, batch, elem) * n
    return {"workspace": workspace_frames(stream) * fkv,
            "new_kv": n * fkv + _pass_bytes(cfg, n * T, batch, elem),
            "compress": max(stream.bank_size - 1, 0) * fkv,
            "latents": (len(stream.denoising_steps) + 2) * lat}


def recache_kept_frames(stream: StreamConfig) -> int:
    """Frames a steady-state re-cache records: only those the cache keeps, the last prev_frames
    (steps._kept_frames); the frames that take the sink's place and those before the window are
    read by the re-cache pass alone."""
    return stream.prev_frames


def switch_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw, batch: int, elem: int) -> int:
    """Extra bytes of a prompt switch (`set_prompt`) in the steady state, above the held state.

    The re-cache runs the last local_attn_size frames again in one pass: its workspace keeps one
    layer at a time (sink + bank + window frames of one layer, `Workspace(one_pass=True)`), the
    K/V of the frames the cache keeps go straight into one tensor (`recache_kept_frames`), then
    the kept bank copies, the new prompt's text K/V, and one layer's activations of an n-frame pass.
    The chunk after a switch is an ordinary one (`chunk_bytes`): the cache then keeps views of the
    re-cache's tensor, which holds only the frames kept, no more storage than a steady window's.
    """
    n, fkv = stream.local_attn_size, frame_kv_bytes(cfg, latent_hw, batch, elem)
    T = tokens_per_frame(cfg, latent_hw)
    ws = stream.sink_size + stream.bank_size + (stream.local_attn_size - stream.sink_size)
    text_kv = 2 * cfg.num_layers * batch * cfg.text_len * cfg.dim * elem
    kv = (recache_kept_frames(stream) + max(stream.bank_size - 1, 0)) * fkv
    return ws * fkv // cfg.num_layers + kv + text_kv + _pass_bytes(cfg, n * T, batch, elem)


def checkpoint_bytes(cfg: ModelConfig, stream: StreamConfig, latent_hw, batch: int, elem: int,
                     vae_cache: int, copied: bool) -> int:
    """One kept checkpoint (generation.Checkpoints): copied off the GPU, `state_to` copies the views
    only (sink + window + bank + pending frames, the prompt, history, one frame per record) plus the
    VAE caches; kept on the model's device, it shares storage with later states and costs about
    one chunk of K/V, one history tensor, its pending record and its own VAE caches."""
    fkv, lat = frame_kv_bytes(cfg, latent_hw, batch, elem), _latent_frame_bytes(cfg, latent_hw, batch, elem)
    if not copied:
        return stream.chunk_frames * fkv + (stream.local_attn_size + stream.chunk_frames) * lat \
            + fkv // stream.record_interval + vae_cache
    kv = stream.sink_size + stream.prev_frames + (stream.bank_size + 1 if stream.bank_size else 0)
    text = batch * cfg.text_len * (cfg.text_dim + 2 * cfg.num_layers * cfg.dim) * elem
    return kv * fkv + text + (stream.local_attn_size + stream.bank_size + 1) * lat + vae_cache


# -- the Wan VAE decoder (vae.py) ---------------------------------------------------------------

def _vae_stages(cfg: VAEConfig, latent_hw, frames: int, first: bool):
    """(in channels, out channels, pixels per frame, frames, temporal upsample after) per stage of
    Decoder3d, for one call on `frames` latent frames (`first`: the clip's first call)."""
    dims = [cfg.dim * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
    pix, out = latent_hw[0] * latent_hw[1], []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        temporal = not last and cfg.temporal_upsample[i]
        out.append((cin if i == 0 else cin // 2, cout, pix, frames, temporal))
        if temporal:  # latent frame 0 of a clip makes one frame, every other frame two
            frames = 2 * frames - (1 if first else 0)
        pix *= 4
    return dims, out


def vae_cache_bytes(cfg: VAEConfig, latent_hw, batch: int, elem: int) -> int:
    """The decode state kept between chunks (vae.VAEDecodeState): the last 2 input frames of every
    causal conv deeper than one frame, at that conv's channels and resolution."""
    dims, stages = _vae_stages(cfg, latent_hw, 1, False)
    hw = latent_hw[0] * latent_hw[1]
    chans = cfg.z_dim * hw + 4 * dims[0] * hw  # conv1; middle: two residual blocks of two convs
    for cin, cout, pix, _, temporal in stages:
        per_block = [cin + cout] + [2 * cout] * cfg.num_res_blocks  # first block's conv1 reads cin
        chans += sum(per_block) * pix + (cout * pix if temporal else 0)
    chans += dims[-1] * stages[-1][2]  # head conv
    return 2 * batch * chans * elem


def _conv_scratch(channels: int, frames: int, device: str) -> int:
    """Elements per pixel a 3x3x3 conv over `frames` (+2 cached) frames needs beside its input and output."""
    if device == "cuda":
        return 2 * channels * (frames + 2)
    return channels * 27 * frames if channels < CPU_IM2COL_BELOW else channels * (frames + 2)


def vae_decode_bytes(cfg: VAEConfig, latent_hw, batch: int, elem: int, chunk_frames: int,
                     per_frame: bool, device: str = "cuda") -> int:
    """Extra bytes of `decode_chunk` on a steady chunk, above the decode state the caller holds.

    Per stage, the largest moment of a residual block (vae.ResidualBlock): its input, the shortcut
    when widths differ, the first conv's output, norm-SiLU of it, the causally padded copy (f + 2
    frames), the conv output and one more padded-input-sized conv buffer; or of an upsample: its
    input, the nearest-x2 copy and the conv output. Plus the new caches (built as the call goes),
    and frame by frame, the previous frame's caches too.

    The conv's own scratch was measured: on CUDA (cuDNN's default algorithms, H200, torch 2.11)
    about two padded inputs (eager decode at 480x832 in bf16: 8.49 GB whole, 6.10 GB per frame;
    these formulas give 8.79 and 6.38); on the CPU (oneDNN) one padded input, except that a 3-D
    conv with fewer than CPU_IM2COL_BELOW input channels unfolds its input (27 x; the tiny VAE).
    """
    frames = 1 if per_frame else chunk_frames
    _, stages = _vae_stages(cfg, latent_hw, frames, False)
    peak = 0
    for i, (cin, cout, pix, f, temporal) in enumerate(stages):
        shortcut = cout if cin != cout else 0
        conv1 = cin * f + shortcut * f + cin * f + cin * (f + 2) + _conv_scratch(cin, f, device) + cout * f
        conv2 = cin * f + shortcut * f + 3 * cout * f + cout * (f + 2) + _conv_scratch(cout, f, device)
        upsample = 0
        if i < len(stages) - 1:  # every stage but the last ends in an Upsample
            f_up = 2 * f if temporal else f
            upsample = cout * f + (cout * f_up if temporal else 0) + cout * f_up * 4 + cout // 2 * f_up * 4
        peak = max(peak, pix * max(conv1, conv2, upsample))
    caches = vae_cache_bytes(cfg, latent_hw, batch, elem)
    held = caches * (2 if per_frame and chunk_frames > 1 else 1)
    return batch * peak * elem + held

"""The umT5 text encoder and its tokenizer, read from Wan's files.

    text = load_text_encoder("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                             "Wan2.1-T2V-1.3B/google/umt5-xxl", output_device="cuda")
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..text_encoder import PromptEncoder, T5Config, Tokenizer, UMT5Encoder
from .build import check_state_dict, meta_shapes
from .errors import KeyMismatch, WeightsNotFound, readme
from .files import read_checkpoint, tensors_only

__all__ = ["infer_t5_config", "load_text_encoder"]


def infer_t5_config(sd: Mapping[str, Tensor], *, source="checkpoint") -> T5Config:
    """A T5Config read off the shapes of a Wan umT5 encoder state dict (242 tensors for umT5-XXL)."""
    shared = "pos_embedding.embedding.weight" in sd
    pos = "pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"
    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", pos]
    absent = [k for k in need if k not in sd]
    if absent:
        raise KeyMismatch(f"{source}: cannot infer the text encoder config, missing {absent}", missing=absent)
    vocab, dim = sd["token_embedding.weight"].shape
    buckets, heads = sd[pos].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return T5Config(vocab=vocab, dim=dim, dim_attn=sd["blocks.0.attn.q.weight"].shape[0],
                    dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0], num_heads=heads, num_layers=max(layers) + 1,
                    num_buckets=buckets, shared_pos=shared)


def load_text_encoder(path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      config: T5Config | None = None,
                      output_device: str | torch.device | None = None) -> PromptEncoder:
    """Load `models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer folder (`google/umt5-xxl`).

    The encoder runs on `device` in `dtype`; embeddings [B, 512, dim] are returned on
    `output_device` (default `device`). config defaults to the one read off the shapes.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        has = sorted(p.name for p in tokenizer_dir.iterdir()) if tokenizer_dir.is_dir() else None
        raise WeightsNotFound(f"tokenizer folder {tokenizer_dir} has no tokenizer.json "
                              f"({'it does not exist' if has is None else f'it holds {has[:10]}'}). Download "
                              f"google/umt5-xxl/* from Wan-AI/Wan2.1-T2V-1.3B ({readme('Which files')}).")
    sd = tensors_only(read_checkpoint(path), path, "text encoder file")
    cfg = config or infer_t5_config(sd, source=path)
    check_state_dict(meta_shapes(lambda: UMT5Encoder(cfg)), sd, source=path,
                     what=f"text encoder (dim {cfg.dim}, {cfg.num_layers} layers)")
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > cfg.vocab:
        raise KeyMismatch(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the encoder {path} "
                          f"embeds only {cfg.vocab}: they do not belong together")
    encoder = UMT5Encoder.from_state_dict(sd, cfg, dtype=dtype, device=device)
    out = torch.device(output_device or device)
    # Encoder elsewhere than the outputs (the usual CPU encoder): always run it where it is. Same
    # device: let PromptEncoder bring it back after an offload().
    return PromptEncoder(encoder, tokenizer, device=out, keep_on_cpu=out != torch.device(device))

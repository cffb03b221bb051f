"""A ready pipeline: MemFlow's weights found or downloaded and loaded, or the tiny random one.

    pipe = load()                                  # downloads what is missing, then loads
    pipe = load(local_dir="/data/memflow")         # a local copy, no network if complete
    pipe = load("tiny", device="cpu")              # random weights, no files: output is noise

Files come from two Hugging Face repos (`memflow_nb.weights.REPOS`); only the five files MemFlow
needs are fetched. With `local_dir` the layout is `<local_dir>/Wan2.1-T2V-1.3B/...` and
`<local_dir>/MemFlow/...` (README, section "Using a local copy").
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, StreamConfig
from .decode import Decoder
from .decode.vae import VAEConfig, WanVAEDecoder
from .model import CausalWanModel
from .precision import DtypeLike, resolve_dtype
from .text_encoder import PromptEncoder, T5Config, Tokenizer, UMT5Encoder
from .weights import fetch_weights, load_dit, load_text_encoder, load_vae, random_module

__all__ = ["Pipeline", "load", "tiny_tokenizer"]


# --------------------------------------------------------------------------------- pipeline

@dataclass(repr=False)
class Pipeline:
    """Everything a stream needs: the DiT, the prompt encoder, the VAE decoder and the settings.

    model: CausalWanModel (`memflow_nb.stream.init_state` / `step` take it).
    text: PromptEncoder; `text(["a prompt"])` -> [B, 512, text_dim] on `device`.
    vae: a `memflow_nb.decode.Decoder`: the Wan VAE (or a TAE) for `decode_chunk`.
    The "tiny" pipeline has random weights: it exercises every code path but makes noise, not pictures.
    """

    model: CausalWanModel
    text: PromptEncoder
    vae: Decoder
    stream: StreamConfig = field(default_factory=StreamConfig)
    name: str = "memflow"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def random_weights(self) -> bool:
        return self.name == "tiny"

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) used when neither the call nor the timeline gives one: MemFlow's
        training size 480x832, or a small 64x112 for the tiny model (noise needs no pixels)."""
        return (64, 112) if self.random_weights else (480, 832)

    def __repr__(self) -> str:
        c = self.model.cfg
        params = sum(p.numel() for p in self.model.parameters())
        note = ", RANDOM WEIGHTS: output is noise, not pictures" if self.random_weights else ""
        return (f"Pipeline(name={self.name!r}, device={self.device}, dtype={self.dtype}, "
                f"dit=dim {c.dim} x {c.num_layers} layers ({params / 1e6:.1f}M params){note})")


def load(name: str = "memflow", *, local_dir: str | os.PathLike | None = None, revision: str | dict | None = None,
         device: str | torch.device | None = None, dtype: DtypeLike = "auto",
         text_encoder_device: str | torch.device = "cpu", text_encoder_dtype: DtypeLike = torch.bfloat16,
         merged_cache_dir: str | os.PathLike | None = None, progress: bool = True, seed: int = 0) -> Pipeline:
    """Load a ready pipeline.

    name: "memflow" (MemFlow on Wan2.1-T2V-1.3B: 1.3B DiT with the LoRA merged, umT5-XXL, Wan VAE)
        or "tiny" (random weights, no files, no network, runs on a CPU in seconds; noise only).
    local_dir, revision: where the files are / which hub revision, see `fetch_weights`.
    device: for the DiT and the VAE (default "cuda" when available).
    dtype: theirs; "auto" (the default) is bf16 on CUDA capability >= 8.0, fp16 below (a T4),
        float32 on the CPU (see `memflow_nb.precision.choose_dtype`). An explicit dtype wins.
    text_encoder_device / _dtype: the 11 GB umT5 encoder; its outputs are moved to `device`.
    merged_cache_dir: keep the LoRA-merged DiT there so the next load skips the merge.
    seed: weight seed of the "tiny" pipeline (ignored otherwise).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    text_encoder_dtype = resolve_dtype(text_encoder_dtype, text_encoder_device, name="text_encoder_dtype")
    if name == "tiny":
        return _tiny(seed, device, dtype)
    if name != "memflow":
        raise ValueError(f"unknown pipeline {name!r}; known: 'memflow', 'tiny'")
    paths = fetch_weights(local_dir, revision, progress=progress)
    from tqdm.auto import tqdm

    with tqdm(total=3, desc="loading MemFlow", disable=not progress) as bar:
        bar.set_postfix_str("DiT + LoRA")
        model = load_dit(paths.base, paths.lora, device=device, dtype=dtype, cache_dir=merged_cache_dir,
                         progress=progress)
        bar.update()
        bar.set_postfix_str("text encoder")
        text = load_text_encoder(paths.text_encoder, paths.tokenizer_dir, device=text_encoder_device,
                                 dtype=text_encoder_dtype, output_device=device)
        bar.update()
        bar.set_postfix_str("VAE")
        vae = load_vae(paths.vae, device=device, dtype=dtype)
        bar.update()
    return Pipeline(model, text, vae, StreamConfig(), "memflow", device, dtype)


# ------------------------------------------------------------------------------------- tiny

TINY_T5 = dict(dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
TINY_VAE = VAEConfig(dim=8)


def tiny_tokenizer():
    """A byte-level `tokenizers.Tokenizer` made in memory: `<pad>`=0, `</s>`=1, `<unk>`=2, then the
    256 byte symbols in a fixed order (259 tokens). Every text encodes, one token per UTF-8 byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def _tiny(seed: int, device: torch.device, dtype: torch.dtype) -> Pipeline:
    # Tokenizer only reads files, so the in-memory one takes a trip through a temporary folder.
    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer().save(str(Path(tmp) / "tokenizer.json"))
        tokenizer = Tokenizer(tmp)
    cfg = ModelConfig.from_name("tiny")
    t5 = T5Config(vocab=tokenizer.vocab_size, dim=cfg.text_dim, **TINY_T5)
    model = random_module(lambda: CausalWanModel(cfg), seed, device=device, dtype=dtype)
    encoder = random_module(lambda: UMT5Encoder(t5), seed + 1, device=device, dtype=dtype)
    vae = random_module(lambda: WanVAEDecoder(TINY_VAE), seed + 2, device=device, dtype=dtype)
    text = PromptEncoder(encoder, tokenizer, device=device, keep_on_cpu=True)
    return Pipeline(model, text, vae, StreamConfig(), "tiny", device, dtype)

"""A ready pipeline: MemFlow's weights found or downloaded and loaded, or the tiny random one.

    pipe = load()                                  # downloads what is missing, then loads
    pipe = load(local_dir="/data/memflow")         # a local copy, no network if complete
    pipe = load("tiny", device="cpu")              # random weights, no files: output is noise

Files come from two Hugging Face repos (`memflow_nb.weights.REPOS`); only the five files MemFlow
needs are fetched. With `local_dir` the layout is `<local_dir>/Wan2.1-T2V-1.3B/...` and
`<local_dir>/MemFlow/...` (README, section "Using a local copy").
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .decode import Decoder
from .decode.tae import TAEConfig, TAEDecoder
from .decode.vae import VAEConfig
from .engine.config import ModelConfig, StreamConfig
from .engine.model import CausalWanModel
from .fast.fp8 import to_fp8
from .lora_stack import add_loras
from .precision import DtypeLike
from .prompt_encoder import PromptEncoder
from .text_encoder import T5Config, Tokenizer, UMT5Encoder
from .weights import fetch_weights, load_dit, load_vae, random_module
from .weights.text import TextEncoderPlacement, load_text_encoder

__all__ = ["Pipeline", "load", "tiny_tokenizer"]


# --------------------------------------------------------------------------------- pipeline

@dataclass(repr=False)
class Pipeline:
    """Everything a stream needs: the DiT, the prompt encoder, the VAE decoder and the settings.

    model: CausalWanModel (`memflow_nb.engine.steps.init_state` / `step` take it).
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
    plan: Any = None  # the memflow_nb.Plan that `load` followed (where each part lives, and why)

    @property
    def random_weights(self) -> bool:
        return self.name == "tiny"

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) used when neither the call nor the timeline gives one: the size `load`
        planned for (by default MemFlow's training size 480x832 where it fits, else the largest of
        that shape that does), or a small 64x112 for the tiny model (noise needs no pixels)."""
        from .planning import DEFAULT_SIZES

        if self.plan is not None:  # the size the plan found room for (a T4 gets less than 480x832)
            return (self.plan.height, self.plan.width)
        return DEFAULT_SIZES[self.name] if self.name in DEFAULT_SIZES else DEFAULT_SIZES["memflow"]

    def __repr__(self) -> str:
        c = self.model.cfg
        params = sum(p.numel() for p in self.model.parameters())
        note = ", RANDOM WEIGHTS: output is noise, not pictures" if self.random_weights else ""
        head = (f"Pipeline(name={self.name!r}, device={self.device}, dtype={self.dtype}, "
                f"dit=dim {c.dim} x {c.num_layers} layers ({params / 1e6:.1f}M params){note})")
        return head if self.plan is None else f"{head}\n{self.plan}"


def load(name: str = "memflow", *, local_dir: str | os.PathLike | None = None, revision: str | dict | None = None,
         device: str | torch.device | None = None, dtype: DtypeLike = "auto", height: int | None = None,
         width: int | None = None, hardware=None, text_encoder: str | os.PathLike | None = None,
         text_encoder_mode: str = "auto", text_encoder_dtype: DtypeLike = "auto", fp8_dit: bool | str = False,
         vae_per_frame: bool | str = "auto", loras=(), merged_cache_dir: str | os.PathLike | None = None,
         progress: bool = True, seed: int = 0) -> Pipeline:
    """Load a ready pipeline, placed by a memory plan made before any file is read.

    name: "memflow" (MemFlow on Wan2.1-T2V-1.3B: 1.3B DiT with the LoRA merged, umT5-XXL, Wan VAE)
        or "tiny" (random weights, no files, no network, runs on a CPU in seconds; noise only).
    local_dir, revision: where the files are / which hub revision, see `fetch_weights`.
    device: for the DiT and the decoder (default "cuda" when available).
    dtype: theirs; "auto" (the default) is bf16 on CUDA capability >= 8.0, fp16 below (a T4),
        float32 on the CPU (see `memflow_nb.precision.choose_dtype`). An explicit dtype wins.
    height, width: the video size to plan for (default 480x832; 64x112 for "tiny").
    hardware: a `memflow_nb.hardware.Hardware` to plan for instead of this machine's free memory.
    text_encoder: another umT5 file instead of Wan's bf16 `.pth` (which is then not downloaded),
        e.g. Kijai's `umt5-xxl-enc-fp8_e4m3fn.safetensors` (6.7 GB; see memflow_nb.weights.text_file).
    text_encoder_mode: "auto" (the plan picks: kept on the GPU when it fits, else streamed block by
        block from the memory-mapped file), "gpu", "streamed" or "cpu"; text_encoder_dtype likewise.
    fp8_dit: store the DiT's block linears in fp8 (compute capability 8.9+; changes the numbers).
    vae_per_frame: decode one latent frame at a time (less memory); "auto": when the plan needs it.
    loras: user LoRAs [(path.safetensors, scale), ...], merged on top of MemFlow's own; their scales
        can change later (memflow_nb.lora_stack.set_lora_scale / remove_lora).
    merged_cache_dir: keep the LoRA-merged DiT there so the next load skips the merge.
    seed: weight seed of the "tiny" pipeline (ignored otherwise).

    Raises `memflow_nb.PlanError` (naming the component, the overage and the fixes) when the plan
    cannot fit, before anything is read or allocated. `pipe.plan` is the plan that was followed.
    """
    from .planning import plan_for_load

    if name not in ("memflow", "tiny"):
        raise ValueError(f"unknown pipeline {name!r}; known: 'memflow', 'tiny'")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # Growable segments instead of fixed blocks: a stream's tensors change size every chunk, and
        # with fixed blocks a 15 GB card ran out with 3.6 GB reserved but unusable (measured). A
        # process-wide allocator setting; set PYTORCH_CUDA_ALLOC_CONF yourself to choose another.
        # torch 2.13 moved the setter (the old name still works there, with a FutureWarning).
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
        setter("expandable_segments:True")
    knobs = dict(height=height, width=width, hardware=hardware, fp8_dit=fp8_dit, vae_per_frame=vae_per_frame,
                 text_encoder_device=text_encoder_mode, text_encoder_dtype=text_encoder_dtype)
    if name == "tiny":
        plan = plan_for_load(name, device, dtype, **knobs)
        pipe = _tiny(seed, device, plan.dtype)
        add_loras(pipe.model, loras)
        return dataclasses.replace(pipe, plan=plan)
    if local_dir is None and text_encoder is None:
        # The hub's files are the preset's shapes: refuse now, not after a 16 GB download.
        plan_for_load(name, device, dtype, **knobs)
    paths = fetch_weights(local_dir, revision, progress=progress,
                          skip=("models_t5_umt5-xxl-enc-bf16.pth",) if text_encoder is not None else ())
    # The plan is made for the files found (their shapes, read from headers and the memory-mapped
    # pickle), before any weight is read into memory.
    plan = plan_for_load(name, device, dtype, configs=file_configs(paths, text_encoder), **knobs)
    from tqdm.auto import tqdm

    with tqdm(total=3, desc="loading MemFlow", disable=not progress) as bar:
        bar.set_postfix_str("DiT + LoRA")
        model = load_dit(paths.base, paths.lora, device=device, dtype=plan.dtype, cache_dir=merged_cache_dir,
                         progress=progress)
        add_loras(model, loras)
        if plan.fp8_dit:
            to_fp8(model)
        bar.update()
        bar.set_postfix_str(f"text encoder ({plan.text_encoder_device})")
        placement = TextEncoderPlacement(plan.text_encoder_device, "cpu" if plan.text_encoder_device == "cpu" else device,
                                         plan.text_encoder_dtype)
        text = load_text_encoder(text_encoder or paths.text_encoder, paths.tokenizer_dir, placement, output_device=device)
        bar.update()
        bar.set_postfix_str("VAE")
        vae = load_vae(paths.vae, device=device, dtype=plan.dtype)
        bar.update()
    return Pipeline(model, text, vae, StreamConfig(), "memflow", device, plan.dtype, plan)


def file_configs(paths, text_encoder=None) -> tuple[ModelConfig, T5Config, VAEConfig]:
    """(DiT, text encoder, VAE) configs of the files `fetch_weights` found, read off their shapes
    without loading a weight (base.pt is memory-mapped, the text encoder's header is read)."""
    from .weights import infer_dit_config, read_checkpoint
    from .weights.dit import dit_state_dict
    from .weights.text_file import read_text_encoder_file

    dit = infer_dit_config(dit_state_dict(read_checkpoint(paths.base), source=paths.base), source=paths.base)
    info, _ = read_text_encoder_file(text_encoder or paths.text_encoder)
    return dit, info.cfg, VAEConfig()


# ------------------------------------------------------------------------------------- tiny

TINY_T5 = dict(dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
TINY_VAE = VAEConfig(dim=8)  # the Wan VAE at width 8: what the tests measure the VAE's footprint on
# The tiny pipeline decodes with a TAE-shaped decoder this narrow: a Wan VAE even at width 8 spends
# about 0.5 s of CPU per chunk in 3-D convolutions (95 % of a chunk), this about 10 ms, so the
# README's main job runs in seconds on a 2-core CPU without AVX512.
TINY_DECODER = TAEConfig(channels=(16, 8, 8, 8), blocks_per_stage=1)


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
    vae = random_module(lambda: TAEDecoder(TINY_DECODER), seed + 2, device=device, dtype=dtype)
    text = PromptEncoder(encoder, tokenizer, device=device, keep_on_cpu=True)
    return Pipeline(model, text, vae, StreamConfig(), "tiny", device, dtype)

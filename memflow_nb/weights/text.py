"""Where the umT5 text encoder runs, and getting its weights there without a second copy.

    placement = text_encoder_placement("auto", "cuda")        # "gpu" when it fits, else "streamed"
    text = load_text_encoder("models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", placement,
                               output_device="cuda")
    emb = text.encode_all(["a fox", "an owl"])                  # [2, 512, 4096], one pass over the file

Three placements (`TextEncoderPlacement.mode`):
- "gpu": every weight kept on the GPU (11.4 GB in bf16; an fp8 file keeps its linears in fp8
  there, 6.7 GB, and widens one block's at a time when it runs).
- "streamed": the weights stay in the memory-mapped file. Each block is copied to `device`,
  applied to every prompt of the batch, and dropped before the next one, so host memory never
  holds a second copy and the GPU holds one block (0.39 GB in bf16) plus activations; the CUDA
  cache is emptied afterwards, before the DiT needs the memory. Also the default on a CPU that
  cannot hold a float32 copy: one block at a time in float32 beats emulated bf16 (USERS.md).
- "cpu": every weight in host memory, in `dtype` (a bf16 `.pth` used in bf16 stays memory-mapped).

The files and their checks: `memflow_nb.weights.text_file`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .errors import KeyMismatch, WeightsNotFound, readme
from .text_file import FP8, SCALE_SUFFIX, read_text_encoder_file
from ..precision import BF16_CAPABILITY, cuda_capability, resolve_dtype
from ..engine.checks import free_bytes as _free_bytes  # free memory of a device: CUDA's, or MemAvailable on the CPU
from ..prompt_encoder import PromptEncoder
from ..text_encoder import Block, RelativeBias, RMSNorm, T5Config, Tokenizer, UMT5Encoder, run_stack

__all__ = ["MODES", "TextEncoderPlacement", "text_encoder_dtype", "choose_mode", "text_encoder_placement",
           "encode_peak_bytes", "BlockwiseEncoder", "load_text_encoder"]

MODES = ("gpu", "streamed", "cpu")


# ------------------------------------------------------------------------------------ placement

@dataclass(frozen=True)
class TextEncoderPlacement:
    """Where the text encoder lives and computes (see the module docstring for the modes).

    mode: "gpu", "streamed" or "cpu". device: where it computes ("cpu" for mode "cpu"; a GPU
    for "gpu"; either for "streamed"). dtype: what it computes in (embeddings come out in it).
    """

    mode: str
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        if self.mode not in MODES:
            raise ValueError(f"text encoder mode={self.mode!r}; use one of {MODES} (or 'auto' in load)")
        if self.mode == "cpu" and self.device.type != "cpu":
            raise ValueError(f"text encoder mode 'cpu' computes on the CPU, not {self.device}")
        if self.mode == "gpu" and self.device.type == "cpu":
            raise ValueError("text encoder mode 'gpu' needs a GPU device; use 'cpu' or 'streamed' on the CPU")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point or self.dtype.itemsize < 2:
            raise ValueError(f"text encoder dtype={self.dtype!r}: use bf16, fp16 or fp32")

    @property
    def streamed(self) -> bool:
        return self.mode == "streamed"


def text_encoder_dtype(device: str | torch.device, capability: tuple[int, int] | None = None) -> torch.dtype:
    """The text encoder's own "auto" dtype: bf16 on CUDA capability >= 8.0, float32 elsewhere.

    Below 8.0 (a T4) the DiT runs in fp16, but umT5's activations outgrow fp16 (Wan clamps them,
    which only hides the overflow): float32 costs nothing there, since a streamed block is
    widened on the GPU and trimmed prompts are a few hundred positions.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    capability = capability if capability is not None else cuda_capability(device)
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float32


def choose_mode(device: str | torch.device, *, resident_bytes: int, free_bytes: int | None,
                reserve_bytes: int = 0) -> str:
    """The placement mode for a device: resident ("gpu" / "cpu") when the weights plus what the
    rest needs there (reserve_bytes) fit in its free memory, "streamed" otherwise (or unknown)."""
    resident = "cpu" if torch.device(device).type == "cpu" else "gpu"
    fits = free_bytes is not None and resident_bytes + reserve_bytes <= free_bytes
    return resident if fits else "streamed"


def _device_dtype(mode: str, device, dtype, capability=None) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = "cpu" if mode == "cpu" or not torch.cuda.is_available() else "cuda"
    device = torch.device(device)
    if mode != "auto":  # refuse a bad mode / device pair before asking the device anything
        TextEncoderPlacement(mode, device, torch.float32)
    if dtype is None or isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return device, text_encoder_dtype(device, capability)
    return device, resolve_dtype(dtype, device, capability, name="text_encoder_dtype")


def text_encoder_placement(mode: str | TextEncoderPlacement = "auto", device: str | torch.device | None = None,
                           dtype="auto", *, resident_bytes: int | None = None, reserve_bytes: int = 0,
                           free_bytes: int | None = None, capability: tuple[int, int] | None = None
                           ) -> TextEncoderPlacement:
    """Resolve "auto" choices into a TextEncoderPlacement (a given placement is returned as is).

    device: default the GPU when there is one (mode "cpu": the CPU). dtype: "auto" is
    `text_encoder_dtype`. mode "auto": `choose_mode` with resident_bytes (the weights as they
    would be kept, see `TextEncoderFile.resident_bytes`), reserve_bytes and free_bytes (default:
    what the device has free now); without resident_bytes, "streamed".
    """
    if isinstance(mode, TextEncoderPlacement):
        return mode
    device, dtype = _device_dtype(mode, device, dtype, capability)
    if mode == "auto":
        free = free_bytes if free_bytes is not None else _free_bytes(device)
        mode = "streamed" if resident_bytes is None else choose_mode(
            device, resident_bytes=resident_bytes, free_bytes=free, reserve_bytes=reserve_bytes)
    return TextEncoderPlacement(mode, device, dtype)


def encode_peak_bytes(cfg: T5Config, dtype: torch.dtype, lengths, *, weights: int = 0, text_len: int = 512) -> int:
    """Estimated peak bytes of one trimmed `encode_all` where the encoder computes.

    lengths: the prompts' token counts. weights: what the placement holds there meanwhile (all
    weights when resident; one block widened to `dtype` when streamed, `TextEncoderFile.
    block_bytes`; 0 for a streamed CPU encoder whose file already holds `dtype`: it uses the
    mapped weights in place). While the blocks run: every prompt's hidden state, and the larger
    of the longest prompt's attention (per head n x n: position bias, scores and their sum in
    `dtype`, the float32 softmax and its float32 input) and its feed-forward (three n x dim_ffn).
    Afterwards: the embeddings [B, text_len, dim] twice (the cache and the copy returned).
    Checked against memflow_nb.live_bytes in tests/test_text_loading.py.
    """
    e, n = dtype.itemsize, max(lengths)
    attention = (cfg.num_heads * n * n * (3 * e + 4 + (4 if dtype != torch.float32 else 0))
                 + n * (2 * cfg.dim + 3 * cfg.dim_attn) * e)
    ffn = n * (3 * cfg.dim_ffn + 2 * cfg.dim) * e
    running = weights + sum(lengths) * cfg.dim * e + max(attention, ffn)
    return max(running, 2 * len(lengths) * text_len * cfg.dim * e)


# ------------------------------------------------------------------------------------ encoder

class BlockwiseEncoder:
    """umT5 that makes each block from `tensors` only when it runs (see `run_stack`).

    tensors: Wan names -> tensors, memory-mapped on the CPU (streamed) or already on `device`
    (resident fp8: linears kept in fp8, widened per block). Each weight goes to `device` first,
    in its stored dtype, then becomes `dtype` there (fp8 * scale computed in float32, rounded
    once). Numbers equal a UMT5Encoder holding the same weights in `dtype`.
    """

    def __init__(self, tensors: Mapping[str, Tensor], cfg: T5Config, *, device, dtype: torch.dtype,
                 streamed: bool = True):
        self.tensors, self.cfg, self.dtype, self.streamed = tensors, cfg, dtype, streamed
        self.device = torch.device(device)
        with torch.device("meta"):
            self._block_keys = list(Block(cfg).state_dict())

    def weight(self, name: str) -> Tensor:
        """One weight on `device` in `dtype`."""
        return self._widen(self.tensors[name], name)

    def _widen(self, t: Tensor, name: str) -> Tensor:
        t = t.to(self.device)
        scale = name[:-len(".weight")] + SCALE_SUFFIX
        if t.dtype == FP8 and scale in self.tensors:
            return (t.float() * self.tensors[scale].to(self.device, torch.float32).reshape(())).to(self.dtype)
        return t.to(self.dtype)

    def _block(self, i: int) -> Block:
        with torch.device("meta"):
            block = Block(self.cfg)
        block.load_state_dict({k: self.weight(f"blocks.{i}.{k}") for k in self._block_keys}, strict=True, assign=True)
        return block.eval()

    def _small(self, module, prefix: str):
        sd = {k: self.weight(prefix + k) for k in module.state_dict()}
        module.load_state_dict(sd, strict=True, assign=True)
        return module

    def _embed(self, ids: Tensor) -> Tensor:
        # Only the rows in use leave the file: a gather from the mapped table, then widened.
        table = self.tensors["token_embedding.weight"]
        rows = table.index_select(0, ids.reshape(-1).to(table.device))
        return self._widen(rows, "token_embedding.weight").view(*ids.shape, -1)

    @torch.no_grad()
    def _run(self, xs_ids: list[Tensor], masks: list) -> list[Tensor]:
        cfg = self.cfg
        with torch.device("meta"):
            norm, shared = RMSNorm(cfg.dim, cfg.eps), (RelativeBias(cfg) if cfg.shared_pos else None)
        norm = self._small(norm, "norm.")
        shared = self._small(shared, "pos_embedding.") if shared is not None else None
        out = run_stack(cfg, [self._embed(i) for i in xs_ids], masks, self._block, shared, norm)
        if self.streamed and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the block buffers back before the DiT needs them
        return out

    def __call__(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids int64 [B, L], mask [B, L] -> hidden [B, L, dim] (as UMT5Encoder.forward)."""
        return self._run([ids], [mask])[0]

    def forward_each(self, ids: list[Tensor]) -> list[Tensor]:
        """Unpadded prompts ids [1, n_i] -> hidden [1, n_i, dim] each, one pass over the blocks."""
        return self._run(list(ids), [None] * len(ids))

    def to(self, device) -> "BlockwiseEncoder":
        """Compute on `device`; resident weights move with it, a streamed encoder's stay in the file."""
        device = torch.device(device)
        if not self.streamed:
            self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        self.device = device
        return self


def load_text_encoder(path: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                        placement: str | TextEncoderPlacement = "auto", *, device=None, dtype="auto",
                        reserve_bytes: int = 0, output_device=None, config: T5Config | None = None,
                        trim: bool = True) -> PromptEncoder:
    """A PromptEncoder for a text-encoder file (Wan's bf16 `.pth` or the fp8 safetensors file).

    placement: a TextEncoderPlacement, a mode, or "auto" (see `text_encoder_placement`; the fit
    check uses the weights as the chosen dtype keeps them plus reserve_bytes). Embeddings come
    back on output_device (default: the encoder's), trimmed per prompt (see `encode_prompts`).
    Everything is checked (file keys and dtypes, tokenizer) before any weight is read.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        has = sorted(p.name for p in tokenizer_dir.iterdir()) if tokenizer_dir.is_dir() else None
        raise WeightsNotFound(f"tokenizer folder {tokenizer_dir} has no tokenizer.json "
                              f"({'it does not exist' if has is None else f'it holds {has[:10]}'}). Download "
                              f"google/umt5-xxl/* from Wan-AI/Wan2.1-T2V-1.3B ({readme('Weights')}).")
    info, tensors = read_text_encoder_file(path, config)
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > info.cfg.vocab:
        raise KeyMismatch(f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the encoder {path} "
                          f"embeds only {info.cfg.vocab}: they do not belong together")
    if not isinstance(placement, TextEncoderPlacement):
        device, dtype = _device_dtype(placement, device, dtype)
        placement = text_encoder_placement(placement, device, dtype, reserve_bytes=reserve_bytes,
                                           resident_bytes=info.resident_bytes(dtype))
    dev, dt = placement.device, placement.dtype
    if placement.streamed:
        encoder = BlockwiseEncoder(tensors, info.cfg, device=dev, dtype=dt, streamed=True)
    elif info.fp8:
        # Kept where it runs, one tensor at a time: fp8 linears (and their scales) as stored.
        kept = {}
        for k in tensors:
            v = tensors[k].to(dev)
            kept[k] = v if v.dtype == FP8 or k.endswith(SCALE_SUFFIX) else v.to(dt)
        encoder = BlockwiseEncoder(kept, info.cfg, device=dev, dtype=dt, streamed=False)
    else:
        # Per tensor: to the device first, then cast, so the host never holds a widened copy.
        sd = {k: tensors[k].to(dev).to(dt) for k in tensors}
        encoder = UMT5Encoder.from_state_dict(sd, info.cfg)
    out = torch.device(output_device) if output_device is not None else dev
    return PromptEncoder(encoder, tokenizer, device=out, keep_on_cpu=out != dev, trim=trim)

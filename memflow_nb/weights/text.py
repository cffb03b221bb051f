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

Files: Wan's `models_t5_umt5-xxl-enc-bf16.pth`, or the fp8 file ComfyUI / Scope users have,
`umt5-xxl-enc-fp8_e4m3fn.safetensors` (Kijai's WanVideo_comfy, about 6.7 GB). Its layout, learnt
from public loaders (kijai/ComfyUI-WanVideoWrapper `nodes.py` LoadWanVideoT5TextEncoder and
`wanvideo/modules/t5.py` T5EncoderModel, which fill Wan's module by these names and keep
"norm", "pos_embedding" and "token_embedding" in the high-precision dtype; daydreamlive/scope's
WanTextEncoderWrapper, which loads it with a strict `load_state_dict` into Wan's `umt5_xxl`):
Wan's 242 names; the 168 block linears (`attn.q/k/v/o`, `ffn.gate.0/fc1/fc2`) stored as
float8_e4m3fn with no scale (a plain cast: 4.6 GB); the token embedding, the norms and the
relative-position tables in bf16 (2.1 GB; 6.73 GB in all, the size that file has). The same
layout with a per-tensor float32 `<linear>.scale_weight` (weight = fp8 * scale, the convention of
ComfyUI's scaled-fp8 ops and Kijai's `_scaled` files) is read too. A file is checked from its
header alone, before any tensor is read: missing, unexpected or mis-shaped keys, a dtype outside
that layout and a missing scale are refused by name.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .errors import KeyMismatch, WeightsNotFound, readme
from .files import read_checkpoint, safetensors_header, tensors_only
from ..precision import BF16_CAPABILITY, cuda_capability, resolve_dtype
from ..engine.checks import free_bytes as _free_bytes  # free memory of a device: CUDA's, or MemAvailable on the CPU
from ..prompt_encoder import PromptEncoder
from ..text_encoder import Block, RelativeBias, RMSNorm, T5Config, Tokenizer, UMT5Encoder, run_stack

__all__ = ["MODES", "TextEncoderPlacement", "text_encoder_dtype", "choose_mode", "text_encoder_placement",
           "TextEncoderFile", "encode_peak_bytes", "read_text_encoder_file", "BlockwiseEncoder",
           "load_text_encoder"]

MODES = ("gpu", "streamed", "cpu")
FP8 = torch.float8_e4m3fn
# The block weights an fp8 file may store as float8_e4m3fn; everything else stays high precision.
_LINEAR = re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.gate\.0|ffn\.fc1|ffn\.fc2)\.weight")
_SCALE_SUFFIX = ".scale_weight"
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "F8_E4M3": FP8, "F8_E5M2": torch.float8_e5m2}
_HIGH = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------ placement

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


# ------------------------------------------------------------------------------------ the file

@dataclass(frozen=True)
class TextEncoderFile:
    """A checked text-encoder file: its config and what each tensor is stored as (no data read).

    dtypes: Wan name -> stored dtype; fp8 names are widened block by block when used.
    scaled: True when the fp8 weights carry `.scale_weight` factors.
    """

    path: Path
    cfg: T5Config
    dtypes: dict
    shapes: dict
    scaled: bool

    @property
    def fp8(self) -> list[str]:
        return sorted(k for k, d in self.dtypes.items() if d == FP8)

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of all weights kept on a device: fp8 ones as stored, the rest in `dtype`."""
        return sum(math.prod(s) * (1 if self.dtypes[k] == FP8 else dtype.itemsize) for k, s in self.shapes.items())

    def block_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one block's weights widened to `dtype`: what a streamed encoder holds at once."""
        return sum(math.prod(s) for k, s in self.shapes.items() if k.startswith("blocks.0.")) * dtype.itemsize


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


def read_text_encoder_file(path: str | os.PathLike, config: T5Config | None = None) -> tuple[TextEncoderFile, dict]:
    """Check a text-encoder file and return (what it holds, its tensors memory-mapped).

    `.safetensors` is checked from its header before a single tensor is touched; a `.pth` is
    opened with torch.load(mmap=True). Raises WeightsNotFound / WeightsCorrupt (io) or
    KeyMismatch naming every problem: missing / unexpected / mis-shaped keys, a dtype outside
    the known layouts (fp8 e4m3 only on block linears), a scale without fp8 weight or missing.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            read_checkpoint(path)  # raises the usual "no such file" message
        header = safetensors_header(path)
        stored = {k: (_ST_DTYPES.get(v["dtype"], v["dtype"]), tuple(v["shape"]))
                  for k, v in header.items() if k != "__metadata__"}
        tensors = None
    else:
        tensors = tensors_only(read_checkpoint(path), path, "text encoder file")
        stored = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    if "shared.weight" in stored or any(k.startswith("encoder.block.") for k in stored):
        raise KeyMismatch(f"{path} uses Hugging Face T5 names (shared.weight, encoder.block.N...), as ComfyUI's "
                          "own umt5_xxl files do; only Wan's names are read. Use Kijai's "
                          "umt5-xxl-enc-fp8_e4m3fn.safetensors (WanVideo_comfy) or Wan's models_t5_umt5-xxl-enc-bf16.pth.",
                          unexpected=sorted(stored)[:20])
    scales = {k[:-len(_SCALE_SUFFIX)] + ".weight": k for k in stored if k.endswith(_SCALE_SUFFIX)}
    weights = {k: v for k, v in stored.items() if not k.endswith(_SCALE_SUFFIX)}
    cfg = config or infer_t5_config({k: torch.empty(s, device="meta") for k, (_, s) in weights.items()}, source=path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UMT5Encoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(f"{k}: {list(weights[k][1])} in the file, the model wants {list(s)}"
                   for k, s in expected.items() if k in weights and weights[k][1] != s)
    for k, (dt, _) in sorted(weights.items()):
        if k not in expected:
            continue
        if dt == FP8 and not _LINEAR.fullmatch(k):
            wrong.append(f"{k}: float8_e4m3fn, but only block linear weights may be fp8 (norms, embeddings "
                         "and position tables stay bf16/fp16/fp32 in the fp8 layout)")
        elif dt != FP8 and dt not in _HIGH:
            wrong.append(f"{k}: dtype {dt} is not supported (use float8_e4m3fn for linears, bf16/fp16/fp32)")
    for w, s in sorted(scales.items()):
        dt, shape = stored[s]
        if weights.get(w, (None,))[0] != FP8:
            unexpected.append(f"{s} (a scale, but {w} is {'absent' if w not in weights else 'not fp8'})")
        elif dt not in _HIGH or math.prod(shape) != 1:
            wrong.append(f"{s}: a scale must be one float (bf16/fp16/fp32), got {dt}{list(shape)}")
    fp8 = [k for k, (dt, _) in weights.items() if dt == FP8 and k in expected]
    lost = sorted(f"{k[:-len('.weight')]}{_SCALE_SUFFIX}" for k in fp8 if k not in scales) if scales else []
    if missing or unexpected or wrong or lost:
        msg = f"{path} does not fit the umT5 text encoder (dim {cfg.dim}, {cfg.num_layers} layers):\n"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrong shapes or dtypes", wrong), ("missing scales (other fp8 weights have one)", lost)):
            if items:
                msg += f"  {len(items)} {title}:\n" + "".join(f"    {s}\n" for s in items[:20])
        msg += ("Use Wan's models_t5_umt5-xxl-enc-bf16.pth or Kijai's umt5-xxl-enc-fp8_e4m3fn.safetensors "
                "(WanVideo_comfy), unmodified.")
        raise KeyMismatch(msg, missing, unexpected, wrong + lost)
    info = TextEncoderFile(path, cfg, {k: dt for k, (dt, _) in weights.items()},
                           {k: s for k, (_, s) in weights.items()}, bool(scales))
    if tensors is None:
        tensors = _SafetensorsTensors(path)
    return info, tensors


class _SafetensorsTensors(Mapping):
    """Tensors of a safetensors file, each read (memory-mapped) only when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._names = set(self._keys)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


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
        scale = name[:-len(".weight")] + _SCALE_SUFFIX
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
            kept[k] = v if v.dtype == FP8 or k.endswith(_SCALE_SUFFIX) else v.to(dt)
        encoder = BlockwiseEncoder(kept, info.cfg, device=dev, dtype=dt, streamed=False)
    else:
        # Per tensor: to the device first, then cast, so the host never holds a widened copy.
        sd = {k: tensors[k].to(dev).to(dt) for k in tensors}
        encoder = UMT5Encoder.from_state_dict(sd, info.cfg)
    out = torch.device(output_device) if output_device is not None else dev
    return PromptEncoder(encoder, tokenizer, device=out, keep_on_cpu=out != dev, trim=trim)

"""The umT5 text encoder's weight files: what they hold, checked before any tensor is read.

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

from .errors import KeyMismatch
from .files import read_checkpoint, safetensors_header, tensors_only
from ..text_encoder import T5Config, UMT5Encoder

__all__ = ["FP8", "SCALE_SUFFIX", "infer_t5_config", "TextEncoderFile", "read_text_encoder_file"]

FP8 = torch.float8_e4m3fn
# The block weights an fp8 file may store as float8_e4m3fn; everything else stays high precision.
_LINEAR = re.compile(r"blocks\.\d+\.(attn\.[qkvo]|ffn\.gate\.0|ffn\.fc1|ffn\.fc2)\.weight")
SCALE_SUFFIX = ".scale_weight"  # a scaled-fp8 file's per-tensor factor: <linear>.scale_weight
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "F8_E4M3": FP8, "F8_E5M2": torch.float8_e5m2}
_HIGH = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


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
    scales = {k[:-len(SCALE_SUFFIX)] + ".weight": k for k in stored if k.endswith(SCALE_SUFFIX)}
    weights = {k: v for k, v in stored.items() if not k.endswith(SCALE_SUFFIX)}
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
    lost = sorted(f"{k[:-len('.weight')]}{SCALE_SUFFIX}" for k in fp8 if k not in scales) if scales else []
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

"""Reading checkpoint files safely and turning them into models.

    model = load_dit("MemFlow/base.pt", "MemFlow/lora.pt", device="cuda", dtype=torch.bfloat16)
    text = load_text_encoder("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                             "Wan2.1-T2V-1.3B/google/umt5-xxl", output_device="cuda")
    vae = load_vae("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", device="cuda")

Every `.pt`/`.pth` is read with `torch.load(weights_only=True, mmap=True)`: a pickle that would
run code is refused (there is no unsafe fallback). Every load is checked before anything is
assigned: each checkpoint key must be consumed, and missing, unexpected or mis-shaped keys are
reported by name in one error. Models are built on the meta device and take the checkpoint
tensors with `assign=True`, so weights are never held twice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .engine.config import MODEL_PRESETS, ModelConfig
from .engine.model import CausalWanModel
from .text_encoder import PromptEncoder, T5Config, Tokenizer, UMT5Encoder
from .vae import VAEConfig, WanVAEDecoder, load_vae_decoder, split_vae_state_dict

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "WeightsNotFound", "WeightsCorrupt", "UnsafeCheckpoint", "KeyMismatch",
           "read_checkpoint", "dit_state_dict", "lora_state_dict", "infer_dit_config", "infer_t5_config",
           "check_state_dict", "merge_lora", "load_dit", "load_text_encoder", "load_vae"]

PEFT_PREFIX = "base_model.model."
_SHOW = 20  # names listed per kind in a key-mismatch message


# ------------------------------------------------------------------------------------- errors

class CheckpointError(Exception):
    """Base of every error this module raises about a weights file."""


class WeightsNotFound(CheckpointError, FileNotFoundError):
    """A file or folder is missing; the message says how to get it."""


class WeightsCorrupt(CheckpointError, ValueError):
    """Truncated, damaged or placeholder (Git LFS pointer) file: download it again."""


class UnsafeCheckpoint(CheckpointError, ValueError):
    """A pickle that needs to run code to load; refused, never loaded unsafely."""


class KeyMismatch(CheckpointError, ValueError):
    """Checkpoint keys do not fit the model. `missing`, `unexpected`, `mismatched` hold every name."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


def _redownload(path) -> str:
    return (f"Delete {path} and download it again (memflow_nb.hub.load fetches missing files; "
            "see docs/weights.md).")


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_SHOW]
    more = f" (first {_SHOW} of {len(items)})" if len(items) > _SHOW else ""
    return f"  {len(items)} {title}{more}:\n" + "".join(f"    {s}\n" for s in shown)


# ------------------------------------------------------------------------------------ reading

_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a `.safetensors` file (flat dict of tensors) or a torch `.pt`/`.pth` pickle (any dict).

    Raises WeightsNotFound, WeightsCorrupt (truncated, bad header, Git LFS pointer) or
    UnsafeCheckpoint (the pickle would run code); every message names the file.
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist)"
        raise WeightsNotFound(f"{path}: no such file{where}. memflow_nb.hub.load downloads MemFlow's files; "
                              "see docs/weights.md for where each one comes from.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        raise WeightsCorrupt(f"{path} is empty. {_redownload(path)}")
    if head.startswith(_LFS_MAGIC):
        raise WeightsCorrupt(f"{path} is a Git LFS pointer ({size} bytes of text), not the weights: the repo "
                             "was cloned without git-lfs. Run `git lfs pull` in that clone, or download the "
                             "file with `hf download` (see docs/weights.md).")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, size)
    return _read_torch(path, head)


def _read_torch(path: Path, head: bytes) -> dict:
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(b"PK\x03\x04") and not is_zip:  # zip start present, central directory gone
        raise WeightsCorrupt(f"{path} is a truncated or damaged zip checkpoint. {_redownload(path)}")
    try:
        # mmap only works for the zip format; legacy pickles are read into memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        if m:
            raise UnsafeCheckpoint(
                f"{path} refuses to load: unpickling it would call {m.group(1)}, which a weights-only load "
                "does not allow (loading it unsafely could run arbitrary code). Use the official file from "
                "the hub, or convert a file you trust to safetensors yourself.") from None
        detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if msg else ""
        raise WeightsCorrupt(f"{path} is not a readable PyTorch checkpoint ({detail or type(e).__name__}); "
                             f"it may be corrupt or not a torch.save file. {_redownload(path)}") from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsCorrupt(f"{path} could not be read ({type(e).__name__}: {str(e)[:200] or 'unexpected end'}); "
                             f"the file is probably truncated. {_redownload(path)}") from e
    if not isinstance(obj, dict):
        raise WeightsCorrupt(f"{path} holds a {type(obj).__name__}, not a dict of tensors. Is it the right file?")
    return obj


def _safetensors_header(path: Path, size: int) -> dict:
    """Parse and sanity-check the header (sizes and offsets) before safetensors maps the file."""
    def corrupt(why):
        return WeightsCorrupt(f"{path} is not a valid safetensors file: {why}. {_redownload(path)}")
    if size < 8:
        raise corrupt(f"it has only {size} bytes")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 100_000_000:
            raise corrupt(f"its header claims {n} bytes but the file has {size} bytes in all (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data, bad = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            bad.append(f"{name}: malformed header entry {info!r}")
            continue
        if not 0 <= b <= e <= data:
            bad.append(f"{name}: bytes {b}..{e} lie outside the {data}-byte data section")
        elif dtype in _ST_ITEMSIZE and e - b != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            bad.append(f"{name}: {dtype}{shape} needs {math.prod(shape) * _ST_ITEMSIZE[dtype]} bytes, "
                       f"the header gives {e - b}")
    if bad:
        raise corrupt("the header lies about tensor sizes:\n" + _listing("bad entries", bad).rstrip())
    return header


def _read_safetensors(path: Path, size: int, device: str = "cpu") -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _safetensors_header(path, size)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise WeightsCorrupt(f"{path} could not be read by safetensors ({e}). {_redownload(path)}") from e


def _tensors_only(sd: Mapping, source, what: str) -> dict[str, Tensor]:
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsCorrupt(f"{source}: the {what} holds non-tensor entries {bad[:_SHOW]}. Is it the right file?")
    return dict(sd)


def dit_state_dict(obj: dict, *, source="checkpoint", use_ema: bool = False) -> dict[str, Tensor]:
    """The DiT weights of a MemFlow `base.pt` dict, with Wan names.

    Takes `generator` (or `generator_ema` with use_ema, or when it is the only one; or `model`),
    or `obj` itself if it is already a flat state dict (a Wan `.safetensors`). Strips the
    `model.` wrapper prefix and any `_fsdp_wrapped_module.` (EMA copies saved under FSDP).
    """
    order = ("generator_ema", "generator", "model") if use_ema else ("generator", "generator_ema", "model")
    key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
    if use_ema and key != "generator_ema":
        raise KeyMismatch(f"{source} has no 'generator_ema' entry (top-level keys: {sorted(obj)[:_SHOW]}); "
                          "load without use_ema=True.")
    if key is None:
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            sd = obj
        else:
            raise KeyMismatch(f"{source} has no 'generator' entry (top-level keys: {sorted(map(str, obj))[:_SHOW]}). "
                              "Pass MemFlow's base.pt or a Wan DiT state dict.")
    else:
        sd = obj[key]
    out = {}
    for k, v in _tensors_only(sd, source, "generator").items():
        name = k.replace("_fsdp_wrapped_module.", "").removeprefix("model.")
        if name in out:
            raise KeyMismatch(f"{source}: two keys become {name!r} once prefixes are stripped")
        out[name] = v
    return out


def lora_state_dict(obj: dict, *, source="checkpoint") -> dict[str, Tensor]:
    """The PEFT LoRA weights of a MemFlow `lora.pt` dict: `generator_lora`, or the dict itself."""
    if isinstance(obj.get("generator_lora"), Mapping):
        obj = obj["generator_lora"]
    elif not any("lora_" in str(k) for k in obj):
        raise KeyMismatch(f"{source} has no 'generator_lora' entry and no lora_A/lora_B keys "
                          f"(top-level keys: {sorted(map(str, obj))[:_SHOW]}). Is it MemFlow's lora.pt?")
    return _tensors_only(obj, source, "LoRA state dict")


# ------------------------------------------------------------------------------ shape checking

def _meta_shapes(module_fn) -> dict[str, tuple[int, ...]]:
    # Build on meta in its own frame, so no model object outlives the check.
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in module_fn().state_dict().items()}


def check_state_dict(expected: Mapping[str, tuple], sd: Mapping[str, Tensor], *, source="checkpoint",
                     what: str = "model") -> None:
    """Raise KeyMismatch naming every missing, unexpected, wrong-shape or wrong-dtype key (first 20 of each).

    Weights must be floating point (any float width; they are cast to the requested dtype).
    """
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = sorted(f"{k}: checkpoint {list(sd[k].shape)}, model {list(expected[k])}"
                   for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k]))
    wrong += sorted(f"{k}: dtype {sd[k].dtype} is not a floating-point type"
                    for k in expected if k in sd and not sd[k].is_floating_point())
    if missing or unexpected or wrong:
        msg = f"{source} does not fit the {what}:\n"
        msg += "".join(_listing(t, items) for t, items in
                       (("missing keys", missing), ("unexpected keys", unexpected),
                        ("wrong shapes or dtypes", wrong)) if items)
        msg += "Check that the file and the config belong together (a different model size needs config=...)."
        raise KeyMismatch(msg, missing, unexpected, wrong)


def infer_dit_config(sd: Mapping[str, Tensor], *, num_heads: int | None = None, source="checkpoint") -> ModelConfig:
    """A ModelConfig read off the weight shapes (Wan names).

    num_heads is not in the shapes: unless given, it is taken from the preset of the same shapes
    ('wan2.1-t2v-1.3b': 12, 'tiny': 4); other sizes need num_heads (or a whole config=...).
    """
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "blocks.0.ffn.0.weight", "head.head.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise KeyMismatch(f"{source}: cannot infer the DiT config, missing {absent}", missing=absent)
    dim, in_dim, *patch = sd["patch_embedding.weight"].shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    shapes = dict(dim=dim, in_dim=in_dim, patch_size=tuple(patch), ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                  text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
                  num_layers=max(layers) + 1, out_dim=sd["head.head.weight"].shape[0] // math.prod(patch))
    if num_heads is None:
        same = [p for p in MODEL_PRESETS.values() if all(getattr(p, k) == v for k, v in shapes.items())]
        if not same:
            raise ValueError(f"{source}: the weight shapes ({shapes}) match no preset, so the head count is "
                             "unknown; pass config=ModelConfig(..., num_heads=...)")
        num_heads = same[0].num_heads
    return ModelConfig(num_heads=num_heads, **shapes)


def merge_lora(sd: Mapping[str, Tensor], lora: Mapping[str, Tensor], *, alpha: float | None = None,
               source="lora", device=None, dtype: torch.dtype | None = None,
               progress: bool = False) -> tuple[dict[str, Tensor], list[str]]:
    """Merge PEFT LoRA weights into a state dict: W <- W + (alpha / r) * B @ A.

    sd: base weights (Wan names). lora: `base_model.model.X.lora_A.weight` [r, in] and
    `...X.lora_B.weight` [out, r] for each target `X.weight` [out, in]. alpha defaults to r
    (MemFlow: rank 256, alpha 256, scale 1). Every LoRA key must be used; problems are listed by
    name before any arithmetic. The sum is done in float32 on `device` (default: where W is),
    then cast to `dtype` (default: W's). Returns (new dict, merged target names); `sd` is unchanged.
    """
    pairs: dict[str, dict[str, Tensor]] = {}
    bad = []
    for k, t in lora.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", k)
        if m is None:
            bad.append(f"{k}: not a {PEFT_PREFIX}<module>.lora_A/lora_B.weight key")
        elif m.group(1) + ".weight" not in sd:
            bad.append(f"{k}: the base has no {m.group(1)}.weight to merge into")
        else:
            pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = t
    for target, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            bad.append(f"{target}: has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b, w = ab["A"].shape, ab["B"].shape, sd[target].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or tuple(w) != (b[0], a[1]):
            bad.append(f"{target}: lora_A {list(a)} and lora_B {list(b)} do not fit the weight {list(w)}")
    if bad:
        raise KeyMismatch(f"{source} does not fit the base weights:\n" + _listing("bad LoRA keys", bad)
                          + "Is this the LoRA trained for this base checkpoint?", unexpected=bad)
    from tqdm.auto import tqdm

    out = dict(sd)
    for target in tqdm(sorted(pairs), desc="merging LoRA", disable=not progress, leave=False):
        a, b, w = pairs[target]["A"], pairs[target]["B"], sd[target]
        scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
        merged = w.to(device=device, dtype=torch.float32) + scale * (
            b.to(device=device, dtype=torch.float32) @ a.to(device=device, dtype=torch.float32))
        out[target] = merged.to(dtype or w.dtype)
    return out, sorted(pairs)


# ---------------------------------------------------------------------------------------- DiT

def _cache_file(cache_dir, base: Path, lora: Path | None, config, dtype, alpha, use_ema) -> tuple[Path, dict]:
    def src(p):
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    key = {"v": 1, "base": src(base), "lora": src(lora) if lora else None, "dtype": str(dtype),
           "alpha": alpha, "ema": use_ema, "config": dataclasses.asdict(config) if config else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"dit-{digest}.safetensors", key


def _read_cache(file: Path, config, device, dtype) -> CausalWanModel | None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads(f.metadata()["memflow_nb"])
        cfg = config or ModelConfig.from_dict(meta["config_used"])
        sd = _read_safetensors(file, file.stat().st_size, device=str(device))
        check_state_dict(_meta_shapes(lambda: CausalWanModel(cfg)), sd, source=file, what="DiT")
        if any(v.dtype != dtype for v in sd.values()):
            raise WeightsCorrupt("dtype differs from its key")
        return _assign(cfg, sd)
    except Exception as e:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring the merged-weights cache {file} ({type(e).__name__}: {e}); rebuilding it")
        file.unlink(missing_ok=True)
        return None


def _write_cache(file: Path, key: dict, cfg: ModelConfig, sd: dict[str, Tensor]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = {**key, "config_used": dataclasses.asdict(cfg)}
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={"memflow_nb": json.dumps(meta)})
        os.replace(tmp, file)  # atomic: a reader never sees half a file
    except Exception as e:  # the cache is an optimisation: never fail the load for it
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the merged-weights cache {file}: {e}")
        return
    # Entries made from older versions of the same source paths can never hit again: remove them.
    for other in file.parent.glob("dit-*.safetensors"):
        try:
            with safe_open(str(other), framework="pt") as f:
                m = json.loads(f.metadata()["memflow_nb"])
            for src in ("base", "lora"):
                if m[src] and key[src] and m[src][0] == key[src][0] and m[src] != key[src]:
                    other.unlink()
                    break
        except Exception:
            pass


def _assign(cfg: ModelConfig, sd: dict[str, Tensor]) -> CausalWanModel:
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:  # cannot happen after check_state_dict, unless the model grows new parameters
        raise KeyMismatch(f"parameters left unloaded: {left[:_SHOW]}", missing=left)
    return model.eval().requires_grad_(False)


def load_dit(base: str | os.PathLike, lora: str | os.PathLike | None = None, *, config: ModelConfig | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             cache_dir: str | os.PathLike | None = None, lora_alpha: float | None = None,
             use_ema: bool = False, progress: bool = False) -> CausalWanModel:
    """Load MemFlow's DiT: base weights, LoRA merged in once, as a CausalWanModel.

    base: `base.pt` (`generator` entry, keys prefixed `model.`) or a Wan `.safetensors` DiT.
    lora: `lora.pt` (PEFT state dict, or under `generator_lora`); merged as W + (alpha/r) B @ A.
    config: the architecture; default inferred from the shapes (see `infer_dit_config`).
    cache_dir: keep the merged weights there as safetensors, keyed by the source files' size and
        mtime, the dtype and the options; a later call with unchanged sources reads only that file.
    Returns the model on `device` in `dtype`, eval mode, requires_grad False. Raises before
    building anything if any key is missing, unexpected, mis-shaped or unused.
    """
    base, lora = Path(base), (Path(lora) if lora is not None else None)
    device = torch.device(device)
    cache = None
    if cache_dir is not None:
        for p in (base, lora):
            if p is not None and not p.is_file():
                read_checkpoint(p)  # raises the usual "no such file"
        cache, key = _cache_file(cache_dir, base, lora, config, dtype, lora_alpha, use_ema)
        if cache.is_file():
            model = _read_cache(cache, config, device, dtype)
            if model is not None:
                log.info("loaded the merged DiT from the cache %s", cache)
                return model
    sd = dit_state_dict(read_checkpoint(base), source=base, use_ema=use_ema)
    cfg = config or infer_dit_config(sd, source=base)
    check_state_dict(_meta_shapes(lambda: CausalWanModel(cfg)), sd, source=base,
                     what=f"DiT (dim {cfg.dim}, {cfg.num_layers} layers)")
    merged = []
    if lora is not None:
        lsd = lora_state_dict(read_checkpoint(lora), source=lora)
        sd, merged = merge_lora(sd, lsd, alpha=lora_alpha, source=lora, device=device, dtype=dtype,
                                progress=progress)
        log.info("%s: merged %d LoRA targets (%d tensors)", lora, len(merged), len(lsd))
    sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
          for k, v in sd.items()}
    model = _assign(cfg, sd)
    if cache is not None:
        _write_cache(cache, key, cfg, sd)
    return model


# ----------------------------------------------------------------------------- text encoder, VAE

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
                              "google/umt5-xxl/* from Wan-AI/Wan2.1-T2V-1.3B (see docs/weights.md).")
    sd = _tensors_only(read_checkpoint(path), path, "text encoder file")
    cfg = config or infer_t5_config(sd, source=path)
    check_state_dict(_meta_shapes(lambda: UMT5Encoder(cfg)), sd, source=path,
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


def load_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config: VAEConfig | None = None) -> WanVAEDecoder:
    """Load the decoder half of `Wan2.1_VAE.pth` (194 tensors; the 86 encoder-only ones are skipped).

    config defaults to VAEConfig() with `dim` read off `decoder.head.0.gamma` (96 for Wan2.1).
    """
    sd = _tensors_only(read_checkpoint(path), path, "VAE file")
    dec, skipped = split_vae_state_dict(sd)
    if config is None:
        gamma = dec.get("decoder.head.0.gamma")
        config = VAEConfig(dim=gamma.shape[0]) if gamma is not None else VAEConfig()
    check_state_dict(_meta_shapes(lambda: WanVAEDecoder(config)), dec, source=path,
                     what=f"VAE decoder (dim {config.dim})")
    log.info("%s: skipped %d encoder-only tensors (decoding needs conv2 and decoder.* only)", path, len(skipped))
    vae, _ = load_vae_decoder(dec, config, device=device, dtype=dtype)
    return vae

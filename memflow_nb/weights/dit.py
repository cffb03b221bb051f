"""MemFlow's DiT: `base.pt` plus `lora.pt` merged once, checked key by key, optionally cached.

    model = load_dit("MemFlow/base.pt", "MemFlow/lora.pt", device="cuda", dtype=torch.bfloat16)

Every load is checked before anything is assigned: each checkpoint key must be consumed, and
missing, unexpected or mis-shaped keys are reported by name in one error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..engine.config import MODEL_PRESETS, ModelConfig
from ..engine.model import CausalWanModel
from .build import build_assigned, check_state_dict, meta_shapes
from .errors import SHOW, KeyMismatch, WeightsCorrupt, listing
from .files import read_checkpoint, read_safetensors, tensors_only

log = logging.getLogger(__name__)

__all__ = ["dit_state_dict", "lora_state_dict", "infer_dit_config", "merge_lora", "load_dit"]

PEFT_PREFIX = "base_model.model."


def dit_state_dict(obj: dict, *, source="checkpoint", use_ema: bool = False) -> dict[str, Tensor]:
    """The DiT weights of a MemFlow `base.pt` dict, with Wan names.

    Takes `generator` (or `generator_ema` with use_ema, or when it is the only one; or `model`),
    or `obj` itself if it is already a flat state dict (a Wan `.safetensors`). Strips the
    `model.` wrapper prefix and any `_fsdp_wrapped_module.` (EMA copies saved under FSDP).
    """
    order = ("generator_ema", "generator", "model") if use_ema else ("generator", "generator_ema", "model")
    key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
    if use_ema and key != "generator_ema":
        raise KeyMismatch(f"{source} has no 'generator_ema' entry (top-level keys: {sorted(obj)[:SHOW]}); "
                          "load without use_ema=True.")
    if key is None:
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            sd = obj
        elif any(k in obj for k in order):  # the entry is there but is no name -> tensor mapping
            k = next(k for k in order if k in obj)
            raise KeyMismatch(f"{source}: its {k!r} entry is a {type(obj[k]).__name__}, not a dict of named "
                              "tensors. Pass MemFlow's base.pt or a Wan DiT state dict.")
        else:
            raise KeyMismatch(f"{source} has no 'generator' entry (top-level keys: {sorted(map(str, obj))[:SHOW]}). "
                              "Pass MemFlow's base.pt or a Wan DiT state dict.")
    else:
        sd = obj[key]
    out = {}
    if any(not isinstance(k, str) for k in sd):
        raise KeyMismatch(f"{source}: the {key or 'state dict'} has keys that are not parameter names "
                          f"({sorted(repr(k) for k in sd if not isinstance(k, str))[:SHOW]}). Is it the right file?")
    for k, v in tensors_only(sd, source, "generator").items():
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
                          f"(top-level keys: {sorted(map(str, obj))[:SHOW]}). Is it MemFlow's lora.pt?")
    return tensors_only(obj, source, "LoRA state dict")


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
            raise _no_preset_error(shapes, sd, source)
        num_heads = same[0].num_heads
    return ModelConfig(num_heads=num_heads, **shapes)


# Where infer_dit_config reads each shape field: (key, which dimensions).
_SHAPE_SOURCES = {"dim": ("patch_embedding.weight", "dim 0"), "in_dim": ("patch_embedding.weight", "dim 1"),
                  "patch_size": ("patch_embedding.weight", "dims 2+"), "ffn_dim": ("blocks.0.ffn.0.weight", "dim 0"),
                  "text_dim": ("text_embedding.0.weight", "dim 1"), "freq_dim": ("time_embedding.0.weight", "dim 1"),
                  "num_layers": ("blocks.N.*", "how many"), "out_dim": ("head.head.weight", "dim 0 / patch volume")}


def _no_preset_error(shapes: dict, sd: Mapping[str, Tensor], source: str) -> ValueError:
    """The error for shapes that match no preset: when all but one or two fields match a preset, the
    keys those fields come from are named as a KeyMismatch (a damaged or edited file is likelier than
    a new model size); otherwise the head count is asked for."""
    def differing(preset):
        return [k for k, v in shapes.items() if getattr(preset, k) != v]

    name, preset = min(MODEL_PRESETS.items(), key=lambda item: len(differing(item[1])))
    off = differing(preset)
    ask = "if it is a model of another size, pass config=ModelConfig(..., num_heads=...)"
    if len(off) > 2:
        return ValueError(f"{source}: the weight shapes ({shapes}) match no preset, so the head count is unknown; "
                          f"{ask}")
    keys = [_SHAPE_SOURCES[k][0] for k in off]
    said = "; ".join(f"{_SHAPE_SOURCES[k][0]} ({_SHAPE_SOURCES[k][1]}) gives {k}={shapes[k]}, "
                     f"the {name!r} preset has {getattr(preset, k)}" + _shape_of(sd, _SHAPE_SOURCES[k][0])
                     for k in off)
    return KeyMismatch(f"{source}: every other shape is the {name!r} preset's, but {said}. Is the file damaged "
                       f"or edited? {ask[0].upper() + ask[1:]}", mismatched=keys)


def _shape_of(sd: Mapping[str, Tensor], key: str) -> str:
    return f" (shape {list(sd[key].shape)})" if key in sd else ""


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
        raise KeyMismatch(f"{source} does not fit the base weights:\n" + listing("bad LoRA keys", bad)
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


# ------------------------------------------------------------------------- the merged cache

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
        sd = read_safetensors(file, device=device)
        check_state_dict(meta_shapes(lambda: CausalWanModel(cfg)), sd, source=file, what="DiT")
        if any(v.dtype != dtype for v in sd.values()):
            raise WeightsCorrupt("dtype differs from its key")
        return build_assigned(lambda: CausalWanModel(cfg), sd)
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


# ------------------------------------------------------------------------------------ loading

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
    check_state_dict(meta_shapes(lambda: CausalWanModel(cfg)), sd, source=base,
                     what=f"DiT (dim {cfg.dim}, {cfg.num_layers} layers)")
    merged = []
    if lora is not None:
        lsd = lora_state_dict(read_checkpoint(lora), source=lora)
        sd, merged = merge_lora(sd, lsd, alpha=lora_alpha, source=lora, device=device, dtype=dtype,
                                progress=progress)
        log.info("%s: merged %d LoRA targets (%d tensors)", lora, len(merged), len(lsd))
    model = build_assigned(lambda: CausalWanModel(cfg), sd, device=device, dtype=dtype)
    if cache is not None:
        _write_cache(cache, key, cfg, model.state_dict())
    return model

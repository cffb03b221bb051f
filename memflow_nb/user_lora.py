"""User LoRAs for Wan2.1-T2V-1.3B: read community files in their several key layouts, check them.

    lora = read_user_lora("style.safetensors", model)   # UserLora: one LoraPatch per touched weight
    loras_from_scope_settings(timeline_settings)        # [(path, scale), ...] from a Scope file

Merging, and changing a scale or removing a LoRA later, exactly: memflow_nb.lora_stack
(`hub.load(..., loras=[(path, scale)])` merges on load). A patch is `coef * B @ A` with
coef = alpha / rank, or a whole-tensor `diff`.

Key layouts understood (learned by reading public loaders; nothing copied):
  * PEFT / diffusers: `transformer.blocks.0.attn1.to_q.lora_A.weight` / `.lora_B.weight`, diffusers
    module names (attn1 = self_attn, attn2 = cross_attn, to_q/k/v/out.0 = q/k/v/o, ffn.net.0.proj =
    ffn.0, ffn.net.2 = ffn.2, norm2/norm3 swapped, condition_embedder.* = the embeddings, proj_out =
    head.head). No alpha in the tensors: alpha = rank, unless the safetensors metadata
    `lora_adapter_metadata` (diffusers) or an `adapter_config.json` beside the file (PEFT) gives
    lora_alpha / alpha_pattern / use_rslora. Also `base_model.model.` (PEFT-wrapped, Wan names, as
    MemFlow's own lora.pt) and an adapter name between lora_A and weight (`lora_A.default.weight`).
    Sources: huggingface/diffusers scripts/convert_wan_to_diffusers.py (the Wan <-> diffusers
    names), src/diffusers/loaders/lora_conversion_utils.py (`_convert_non_diffusers_wan_lora_to_diffusers`,
    `_convert_musubi_wan_lora_to_diffusers`), src/diffusers/loaders/lora_base.py (metadata key).
  * kohya / musubi-tuner: `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`,
    `.alpha` (a 0-d tensor; 0 means alpha = rank). Source: kohya-ss/musubi-tuner
    src/musubi_tuner/networks/lora.py and lora_wan.py, src/musubi_tuner/convert_lora.py.
    Wan-Fun files write `lora_unet__` (two underscores): comfyanonymous/ComfyUI (Comfy-Org)
    comfy/lora_convert.py. `lycoris_` + flattened names (SimpleTuner / ai-toolkit): comfy/lora.py
    (`model_lora_keys_unet`) and kijai/ComfyUI-WanVideoWrapper nodes_model_loading.py
    (`standardize_lora_key_format`).
  * ComfyUI: `diffusion_model.blocks.0.self_attn.q.lora_A.weight` (or lora_down / lora_up), optional
    `.alpha` (absent: scale 1), whole-tensor `.diff` and bias `.diff_b` patches: comfyanonymous/ComfyUI
    comfy/lora.py (`load_lora`, `model_lora_keys_unet`); the Wan distill LoRAs carry diffs.
    `pipe.dit.` (DiffSynth), `transformer.` with Wan names and bare `blocks.0...` keys:
    kijai/ComfyUI-WanVideoWrapper nodes_model_loading.py.
LoHa / LoKr / DoRA factors are refused by name. Files for another model (a 14B, an image-to-video
or a VACE model) are recognised and refused as such. Only safetensors files are read.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .weights.errors import KeyMismatch, UnsafeCheckpoint
from .weights.files import read_checkpoint

__all__ = ["LoraForAnotherModel", "LoraPatch", "UserLora", "read_user_lora", "loras_from_scope_settings"]


class LoraForAnotherModel(KeyMismatch):
    """The LoRA was made for another Wan model (another size, image-to-video, VACE)."""


# --------------------------------------------------------------------------------- key names

# Wan module name (inside a block, or at the top) -> the diffusers name of the same module. attn1
# is self-attention, as diffusers' converter defines it (kijai's wrapper maps a "finetrainers"
# attn1 to cross_attn; diffusers owns these names, so we follow diffusers).
_DIFFUSERS_IN_BLOCK = {
    **{f"self_attn.{p}": f"attn1.{d}" for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"cross_attn.{p}": f"attn2.{d}" for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table",
}
_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
}
_DOTTED_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "pipe.dit.")
_FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_")
_KEY = re.compile(r"(?P<module>.+?)\.(?P<role>lora_(?:A|B|down|up)(?:\.\w+)?\.weight|lora_B(?:\.\w+)?\.bias"
                  r"|alpha|diff_b|diff)")
_UNSUPPORTED = re.compile(r"\.(hada_|lokr_|dora_scale|lora_mid)")
# Markers of models this one is not: image conditioning (I2V / FLF2V / Fun-InP) and VACE.
_IMAGE_MARKERS = re.compile(r"k_img|v_img|img_emb|add_k_proj|add_v_proj|norm_added_k|image_embedder")
_VACE_MARKER = re.compile(r"vace")
_BLOCK_INDEX = re.compile(r"(?:^|[._])blocks[._](\d+)(?:[._]|$)")
_QUERY = re.compile(r"(?:self_attn[._]q|attn1[._]to_q)$")
# Only to name a model in an error message (Wan2.1 / Wan2.2 technical reports and configs).
_KNOWN_WIDTHS = {1536: "Wan2.1-T2V-1.3B (30 blocks)", 3072: "Wan2.2-TI2V-5B (30 blocks)",
                 5120: "a 14B Wan model (Wan2.1 / Wan2.2 T2V, I2V or FLF2V; 40 blocks)"}


def _diffusers_name(module: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m:
        inner = _DIFFUSERS_IN_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return _DIFFUSERS_TOP.get(module)


def _aliases(shapes: Mapping[str, tuple]) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted alias -> Wan module, flattened alias -> Wan module) for every parameter of the model.

    A module is a parameter name less `.weight` (`blocks.0.self_attn.q`), or the parameter itself
    when it has no `.weight` (`blocks.0.modulation`).
    """
    dotted, flat = {}, {}
    for name in shapes:
        if name.endswith(".bias"):
            continue
        module = name.removesuffix(".weight")
        for alias in filter(None, (module, _diffusers_name(module))):
            dotted[alias] = module
            flat[alias.replace(".", "_")] = module
    return dotted, flat


def _wan_module(module: str, dotted: dict, flat: dict) -> tuple[str | None, str]:
    """(Wan module or None, the name with its prefix removed) for the module part of a key."""
    for p in _FLAT_PREFIXES:
        if module.startswith(p):
            rest = module[len(p):]
            return flat.get(rest), rest
    rest = next((module[len(p):] for p in _DOTTED_PREFIXES if module.startswith(p)), module)
    return dotted.get(rest), rest


def _layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(_FLAT_PREFIXES) for k in keys):
        return "kohya/musubi (flattened lora_unet_* / lycoris_* names)"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ComfyUI (diffusion_model.*)"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in keys):
        return "PEFT/diffusers (lora_A/lora_B)"
    return "bare Wan module names"


# ------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class LoraPatch:
    """The change one LoRA makes to one parameter: `coef * up @ down`, or `coef * diff`.

    target: the model's parameter name (Wan names). up [out, r] (B, lora_up), down [r, in]
    (A, lora_down), kept as in the file (small); diff: a whole-tensor delta of the target's shape.
    coef: alpha / rank (or alpha / sqrt(rank) for rsLoRA; 1 for diffs). The user's scale multiplies it.
    """

    target: str
    coef: float
    up: Tensor | None = None
    down: Tensor | None = None
    diff: Tensor | None = None

    def delta(self, device) -> Tensor:
        """The unscaled change, float32 on `device`, shaped like the target."""
        if self.diff is not None:
            return self.diff.to(device=device, dtype=torch.float32)
        return self.up.to(device=device, dtype=torch.float32) @ self.down.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class UserLora:
    """A user LoRA checked against one model: where it came from, its layout, one patch per target."""

    path: Path
    layout: str
    patches: tuple[LoraPatch, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.patches for t in (p.up, p.down, p.diff)
                   if t is not None)


def _peft_config(path: Path) -> dict:
    """lora_alpha / alpha_pattern / use_rslora from diffusers' safetensors metadata, or from the
    adapter_config.json beside a PEFT adapter_model.safetensors; {} when neither says."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw:
        meta = json.loads(raw)
        return {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith("transformer.")} or meta
    side = path.with_name("adapter_config.json")  # PEFT's save_pretrained folder, and only that
    return json.loads(side.read_text()) if path.name == "adapter_model.safetensors" and side.is_file() else {}


def _coefficient(alpha_t: Tensor | None, rank: int, module: str, config: dict) -> float:
    if alpha_t is not None:  # kohya / musubi / ComfyUI: a 0-d tensor per module; 0 means "no scaling"
        alpha = float(alpha_t.reshape(()).item())
        return alpha / rank if alpha else 1.0
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT: a suffix of the module name
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            alpha = value
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_safetensors_only(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".safetensors":
        raise UnsafeCheckpoint(
            f"{path}: user LoRAs are read only from .safetensors files (a .pt/.ckpt/.bin pickle can run code "
            "when it is loaded): convert it to safetensors once, on a machine you trust, e.g.\n"
            f"  python -c \"import torch, safetensors.torch as s; s.save_file(torch.load('{path}', "
            f"weights_only=True), '{path.with_suffix('.safetensors')}')\"")
    sd = read_checkpoint(path)
    if not sd:
        raise KeyMismatch(f"{path} holds no tensors: it is not a LoRA.")
    return sd


def _refuse_other_models(path: Path, stripped: dict[str, str], sd: Mapping[str, Tensor], dim: int,
                         num_layers: int) -> None:
    """Raise LoraForAnotherModel when the keys or shapes say the LoRA is for another Wan model."""
    ours = f"this model is width {dim} with {num_layers} blocks ({_KNOWN_WIDTHS.get(dim, 'a custom size')})"
    image = sorted(k for k, m in stripped.items() if _IMAGE_MARKERS.search(m))
    if image:
        raise LoraForAnotherModel(
            f"{path} is a LoRA for an image-conditioned Wan model (image-to-video, FLF2V or Fun-InP): it has "
            f"{len(image)} keys for the image branch, e.g. {image[0]}. MemFlow is text-to-video; use a LoRA "
            "trained on Wan2.1-T2V-1.3B.", unexpected=image)
    vace = sorted(k for k, m in stripped.items() if _VACE_MARKER.search(m))
    if vace:
        raise LoraForAnotherModel(f"{path} is a LoRA for a Wan VACE model ({len(vace)} VACE keys, e.g. {vace[0]}); "
                                  "use a LoRA trained on Wan2.1-T2V-1.3B.", unexpected=vace)
    widths = {int(sd[k].shape[-1]) for k, m in stripped.items()
              if _QUERY.search(m) and re.search(r"lora_(A|down)\b", k) and sd[k].ndim == 2}
    blocks = {int(b.group(1)) for m in stripped.values() if (b := _BLOCK_INDEX.search(m))}
    wrong_width = sorted(w for w in widths if w != dim)
    if wrong_width or (blocks and max(blocks) >= num_layers):
        w = wrong_width[0] if wrong_width else dim
        made = _KNOWN_WIDTHS.get(w, f"a Wan model of width {w}") if wrong_width else "a deeper Wan model"
        depth = f", with blocks up to {max(blocks)}" if blocks else ""
        raise LoraForAnotherModel(f"{path} is a LoRA for {made} (width {w}{depth}); {ours}. "
                                  "Use a LoRA trained on Wan2.1-T2V-1.3B.")


def read_user_lora(path, model: nn.Module) -> UserLora:
    """Read a LoRA `.safetensors` file in any layout above and check it against `model`.

    Every problem is reported at once, before anything changes: the keys that match no layer (all
    of them), factors that do not fit their layer (named), a missing half of a pair; a LoRA for
    another model raises LoraForAnotherModel. Returns the patches with Wan parameter names.
    """
    path = Path(path)
    sd = _read_safetensors_only(path)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    dotted, flat = _aliases(shapes)
    cfg = model.cfg
    config = _peft_config(path)

    parts: dict[str, dict[str, Tensor]] = defaultdict(dict)  # Wan module -> role -> tensor
    original: dict[str, str] = {}  # Wan module -> its name in the file (for alpha_pattern and messages)
    stripped, unmatched, bad, notes = {}, [], [], {}
    for key, t in sd.items():
        m = _KEY.fullmatch(key)
        if m is None:
            why = "LoHa / LoKr / DoRA factors are not supported" if _UNSUPPORTED.search(key) else "not a LoRA key"
            unmatched.append(key)
            notes[key] = f"  ({why})"
            continue
        module, rest = _wan_module(m.group("module"), dotted, flat)
        stripped[key] = rest
        if module is None:
            unmatched.append(key)
            continue
        role = m.group("role")
        role = ("bias" if role.endswith(".bias") else "down" if role.startswith(("lora_A", "lora_down"))
                else "up" if role.startswith(("lora_B", "lora_up")) else role)
        if role in parts[module]:
            bad.append(f"{module}: two keys give its {role} (one is {key})")
        if role != "alpha" and not t.is_floating_point():  # an alpha may be an integer
            bad.append(f"{key}: dtype {t.dtype} is not a floating-point type")
        parts[module][role] = t
        original[module] = rest
    _refuse_other_models(path, stripped, sd, cfg.dim, cfg.num_layers)

    patches = []
    for module, p in sorted(parts.items()):
        target = module + ".weight" if module + ".weight" in shapes else module
        shape = shapes[target]
        if "alpha" in p and p["alpha"].numel() != 1:
            bad.append(f"{module}: alpha has {p['alpha'].numel()} values, expected one")
            continue
        if ("up" in p) != ("down" in p):
            have, lack = ("lora_up/B", "lora_down/A") if "up" in p else ("lora_down/A", "lora_up/B")
            bad.append(f"{module}: has {have} but no {lack}")
            continue
        if "up" in p:
            up, down = p["up"], p["down"]
            if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
                bad.append(f"{module}: lora_up/B {list(up.shape)} and lora_down/A {list(down.shape)} do not share "
                           "a rank (expected [out, r] and [r, in])")
            elif (up.shape[0], down.shape[1]) != shape:
                bad.append(f"{module}: the LoRA makes a [{up.shape[0]}, {down.shape[1]}] change, the layer's "
                           f"weight is {list(shape)}")
            else:
                coef = _coefficient(p.get("alpha"), down.shape[0], original[module], config)
                patches.append(LoraPatch(target, coef, up=up, down=down))
                if "bias" in p:
                    patches += _diff_patch(module + ".bias", p["bias"], shapes, bad, coef)
        elif "bias" in p:
            bad.append(f"{module}: has lora_B.bias but no lora_A/lora_B pair")
        elif "alpha" in p and not ("diff" in p or "diff_b" in p):
            bad.append(f"{module}: has an alpha but no lora_A/lora_B pair")
        if "diff" in p:
            patches += _diff_patch(target, p["diff"], shapes, bad, 1.0)
        if "diff_b" in p:
            patches += _diff_patch(module + ".bias", p["diff_b"], shapes, bad, 1.0)
    if unmatched or bad:
        msg = f"{path} ({_layout(sd)}) does not fit this model (width {cfg.dim}, {cfg.num_layers} blocks):\n"
        if unmatched:
            msg += f"  {len(unmatched)} keys match no layer:\n" + "".join(f"    {k}{notes.get(k, '')}\n" for k in sorted(unmatched))
        if bad:
            msg += f"  {len(bad)} layers do not fit:\n" + "".join(f"    {b}\n" for b in sorted(bad))
        msg += "Is it a LoRA for Wan2.1-T2V-1.3B (the DiT, not the text encoder)?"
        raise KeyMismatch(msg, unexpected=unmatched, mismatched=bad)
    return UserLora(path, _layout(sd), tuple(patches))


def _diff_patch(target: str, t: Tensor, shapes: Mapping, bad: list, coef: float) -> list[LoraPatch]:
    if target not in shapes:
        bad.append(f"{target}: the model has no such parameter")
    elif tuple(t.shape) != shapes[target]:
        bad.append(f"{target}: the file's change is {list(t.shape)}, the parameter is {list(shapes[target])}")
    else:
        return [LoraPatch(target, coef, diff=t)]
    return []


# -------------------------------------------------------------------------------------- Scope

def check_scale(scale, what: str) -> float:
    """A LoRA scale as a float; ValueError naming `what` unless it is a finite number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what}: scale {scale!r} must be a finite number")
    return float(scale)


_SCOPE_STRATEGIES = ("permanent_merge", "runtime_peft")


def loras_from_scope_settings(settings: Mapping, *, lora_dir=None) -> list[tuple[str, float]]:
    """[(path, scale), ...] from a Scope timeline's `settings` (timeline files of version 2.1).

    Scope writes `settings.loras` as a list of {id, path, scale, mergeMode?} and a global
    `settings.loraMergeStrategy`, "permanent_merge" or "runtime_peft". Both strategies give the same
    pictures here: LoRAs are merged, and their scales can still change (set_lora_scale). A slot with
    an empty path (added in Scope, no file chosen) is skipped with a warning. Scope writes absolute
    paths of the machine that made the file; lora_dir: a folder holding the LoRAs here, which
    relative paths are joined to and where an absolute path missing here is looked up by file name.
    """
    loras = settings.get("loras")
    if loras is None:
        return []
    if not isinstance(loras, list):
        raise ValueError(f"settings.loras must be a list of {{path, scale}}, got {type(loras).__name__}")
    strategies = [("settings.loraMergeStrategy", settings.get("loraMergeStrategy"))]
    out = []
    for i, item in enumerate(loras):
        where = f"settings.loras[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be an object {{path, scale}}, got {item!r}")
        path = item.get("path")
        if not isinstance(path, str):
            raise ValueError(f"{where}.path must be a string (the LoRA file), got {path!r}")
        scale = check_scale(item.get("scale", 1.0), f"{where}.scale")
        strategies.append((f"{where}.mergeMode", item.get("mergeMode")))
        if not path.strip():
            warnings.warn(f"{where} has no path (a LoRA slot with no file chosen in Scope); skipped", stacklevel=2)
            continue
        p = Path(path).expanduser()
        if lora_dir is not None:
            here = Path(lora_dir).expanduser()
            name = re.split(r"[\\/]", path)[-1]  # also for a path written on Windows
            tries = [p if p.is_absolute() else here / p, here / name]
            p = next((t for t in tries if t.exists()), tries[0])
        out.append((str(p), scale))
    odd = [f"{w}={v!r}" for w, v in strategies if v is not None and v not in _SCOPE_STRATEGIES]
    if odd:
        warnings.warn(f"unknown LoRA merge strategy {', '.join(odd)} (Scope knows {list(_SCOPE_STRATEGIES)}); "
                      "LoRAs are merged with changeable scales", stacklevel=2)
    return out

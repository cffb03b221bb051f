"""Merging user LoRAs into a loaded model, and changing or removing them later, exactly.

    names = add_loras(model, [("style.safetensors", 0.8), ("motion.safetensors", 1.0)])
    set_lora_scale(model, "style", 0.5)    # the same bits as a fresh load with scale 0.5
    remove_lora(model, "motion")           # the same bits as a fresh load without it
    lora_scales(model)                     # {"style": 0.5}

A merged weight is `W0 + sum_i scale_i * coef_i * delta_i` (coef = alpha / rank, delta = B @ A;
see memflow_nb.user_lora), summed in float32 in the order the LoRAs were added, then cast to the
weight's dtype. Every change recomputes the touched weights from their kept originals, so the
result never depends on the history of changes. Changing weights does not touch a running
stream's caches (cross-attention keys and values are cached per prompt): make a new state, or set
the prompt again, after a change.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from .user_lora import UserLora, check_scale, read_user_lora

__all__ = ["LoraStack", "add_loras", "add_lora", "set_lora_scale", "remove_lora", "lora_scales"]


@dataclass
class _Applied:
    name: str
    lora: UserLora
    scale: float


@dataclass
class LoraStack:
    """The user LoRAs merged into one model (in order, with their scales) and the original of every
    weight they touch. Lives on the model as `model.user_loras`.

    Why originals and not the difference: in bf16 (and even float32) `(W0 + d) - d` is not W0, so
    subtracting what was added cannot give the exact weights back, and a record of the difference
    exact enough to undo it needs more bits than the weight (float32 for a bf16 weight). The
    original itself is the cheapest exact record, and a new scale needs it anyway. It is kept once per touched weight, in that weight's dtype, in host memory (none on the
    GPU): for a LoRA on every block linear of the 1.3B in bf16 about 2.8 GB of RAM, less for LoRAs
    that touch fewer layers; it is freed when the last LoRA on a weight is removed.
    """

    applied: list[_Applied] = field(default_factory=list)
    originals: dict[str, Tensor] = field(default_factory=dict)


def _stack(model: nn.Module) -> LoraStack:
    stack = getattr(model, "user_loras", None)
    if stack is None:
        stack = LoraStack()
        model.user_loras = stack
    return stack


@torch.no_grad()
def _refresh(model: nn.Module, stack: LoraStack, targets: Iterable[str]) -> None:
    """Recompute each target from its original and every applied LoRA, in order (float32, then cast)."""
    params = dict(model.named_parameters())
    gone = sorted(t for t in targets if t not in params)
    if gone:
        raise ValueError(f"the model no longer has the parameters {gone[:5]} (converted to fp8 or optimized?): "
                         "change user LoRAs on the model as loaded, before memflow_nb's fast mode.")
    terms = defaultdict(list)
    for entry in stack.applied:
        for patch in entry.lora.patches:
            terms[patch.target].append((entry.scale * patch.coef, patch))
    for target in sorted(set(targets)):
        param, original = params[target], stack.originals[target]
        if not terms[target]:
            param.copy_(original)
            del stack.originals[target]
            continue
        acc = original.to(device=param.device, dtype=torch.float32, copy=True)
        for weight, patch in terms[target]:
            acc.add_(patch.delta(param.device), alpha=weight)
        param.copy_(acc.to(param.dtype))


def add_loras(model: nn.Module, loras: Iterable, *, names: Iterable[str] | None = None) -> list[str]:
    """Merge user LoRAs into `model` in place: `loras` is [(path, scale), ...].

    Every file is read and checked before any weight changes; on any error the model is as before.
    Names default to the file stems (made unique with -2, -3, ...); returns them, in order. The
    factors and the originals of the touched weights are kept (see LoraStack), so `set_lora_scale`
    and `remove_lora` work later without reloading anything.
    """
    items = list(loras or ())
    if not items:
        return []
    if any(n.endswith("weight_fp8") for n, _ in model.named_buffers()):
        raise ValueError("this model's linear layers are fp8 (fast mode): add user LoRAs to the model as "
                         "loaded, then optimize it.")
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"loras[{i}] = {item!r}: loras must be a list of (path, scale) pairs")
    scales = [check_scale(scale, f"loras[{i}] ({path})") for i, (path, scale) in enumerate(items)]
    read = [(read_user_lora(path, model), scale) for (path, _), scale in zip(items, scales)]
    stack = _stack(model)
    taken = {a.name for a in stack.applied}
    wanted = list(names) if names is not None else [lora.path.stem for lora, _ in read]
    if len(wanted) != len(read):
        raise ValueError(f"{len(wanted)} names for {len(read)} LoRAs")
    chosen = []
    for base in wanted:
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        chosen.append(name)
    params = dict(model.named_parameters())
    targets = {p.target for lora, _ in read for p in lora.patches}
    new_originals = {t: params[t].detach().to("cpu", copy=True) for t in targets if t not in stack.originals}
    before = len(stack.applied)
    stack.originals.update(new_originals)
    stack.applied += [_Applied(name, lora, scale) for name, (lora, scale) in zip(chosen, read)]
    try:
        _refresh(model, stack, targets)
    except BaseException:  # e.g. out of memory half way: put every weight back as it was
        del stack.applied[before:]
        _refresh(model, stack, targets)
        raise
    return chosen


def add_lora(model: nn.Module, path, scale: float = 1.0, *, name: str | None = None) -> str:
    """Merge one user LoRA (see add_loras); returns its name."""
    return add_loras(model, [(path, scale)], names=None if name is None else [name])[0]


def _find(model: nn.Module, name: str) -> tuple[LoraStack, _Applied]:
    stack = getattr(model, "user_loras", None)
    entry = next((a for a in stack.applied if a.name == name), None) if stack else None
    if entry is None:
        known = [a.name for a in stack.applied] if stack else []
        raise KeyError(f"no user LoRA named {name!r} on this model; applied: {known}")
    return stack, entry


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """Change the scale of an applied LoRA. The weights become exactly those a fresh load with the
    new scale gives (recomputed from the kept originals). Scale 0 keeps the LoRA, without effect."""
    stack, entry = _find(model, name)
    scale = check_scale(scale, f"LoRA {name!r}")
    old, entry.scale = entry.scale, scale
    try:
        _refresh(model, stack, {p.target for p in entry.lora.patches})
    except BaseException:
        entry.scale = old
        raise


def remove_lora(model: nn.Module, name: str) -> None:
    """Take a LoRA out: its weights become exactly what they would be without it (the base weights,
    bit for bit, when it was the only one); its factors and unneeded originals are freed."""
    stack, entry = _find(model, name)
    index = stack.applied.index(entry)
    del stack.applied[index]
    try:
        _refresh(model, stack, {p.target for p in entry.lora.patches})
    except BaseException:
        stack.applied.insert(index, entry)
        raise


def lora_scales(model: nn.Module) -> dict[str, float]:
    """{name: scale} of the user LoRAs applied to `model`, in the order they were added."""
    stack = getattr(model, "user_loras", None)
    return {a.name: a.scale for a in stack.applied} if stack else {}

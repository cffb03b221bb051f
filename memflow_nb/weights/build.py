"""Modules built on the meta device and given their weights by assignment, checked before.

    expected = meta_shapes(lambda: CausalWanModel(cfg))      # names -> shapes, no memory used
    check_state_dict(expected, sd, source=path, what="DiT")  # every bad key listed, or nothing
    model = build_assigned(lambda: CausalWanModel(cfg), sd, device="cuda", dtype=torch.bfloat16)
    model = random_module(lambda: CausalWanModel(cfg), seed=0)  # the golden files' random weights

Building on meta then `load_state_dict(assign=True)` means weights are never held twice and a
CPU load can keep them memory-mapped from their file.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .errors import SHOW, KeyMismatch, listing

__all__ = ["meta_shapes", "check_state_dict", "build_assigned", "split_state_dict", "recipe_weights",
           "random_module"]

Build = Callable[[], nn.Module]


def meta_shapes(build: Build) -> dict[str, tuple[int, ...]]:
    """Names and shapes of `build()`'s state dict, built on the meta device (no memory used)."""
    # Built in this frame, so no module outlives the call (a failed load keeps nothing alive).
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


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
        msg += "".join(listing(t, items) for t, items in
                       (("missing keys", missing), ("unexpected keys", unexpected),
                        ("wrong shapes or dtypes", wrong)) if items)
        msg += "Check that the file and the config belong together (a different model size needs config=...)."
        raise KeyMismatch(msg, missing, unexpected, wrong)


def build_assigned(build: Build, sd: Mapping[str, Tensor], *, device=None, dtype: torch.dtype | None = None):
    """`build()` on the meta device, then `sd` assigned by name (strict); eval mode, no grads.

    Floating-point tensors are moved to `device` and cast to `dtype` first (None: left as they
    are, so memory-mapped tensors stay mapped). Run `check_state_dict` before, for messages that
    list every bad key; this raises KeyMismatch only if a parameter is left on meta.
    """
    with torch.device("meta"):
        module = build()
    if device is not None or dtype is not None:
        sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
              for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if left:  # a strict load assigns every saved tensor; only an unsaved one can stay on meta
        raise KeyMismatch(f"{type(module).__name__}: parameters left unloaded: {left[:SHOW]}", missing=left)
    return module.eval().requires_grad_(False)


def split_state_dict(sd: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]]:
    """(keys not starting with `prefixes`, sorted keys that do). Unknown keys stay in the first
    dict, so a strict load still fails on them."""
    keep, skipped = {}, []
    for k, v in sd.items():
        if k.startswith(prefixes):
            skipped.append(k)
        else:
            keep[k] = v
    return keep, sorted(skipped)


def recipe_weights(shapes: Mapping[str, tuple[int, ...]], seed: int, *,
                   dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random weights made exactly as the golden files' recipe says (float32 on the CPU, then `dtype`).

    Names are drawn in sorted order, one `randn` per tensor from one generator, then scaled:
    modulation x0.1; 1-D norm weights 1 + 0.1 x; other 1-D tensors x0.02; matrices / sqrt(fan_in).
    Drawn on the CPU, so a seed gives the same weights whatever device they end up on.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name in sorted(shapes):
        shape = tuple(int(s) for s in shapes[name])
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if "modulation" in name:
            t = 0.1 * t
        elif len(shape) == 1 and "norm" in name:
            t = 1.0 + 0.1 * t
        elif len(shape) == 1:
            t = 0.02 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        out[name] = t.to(dtype)  # cast tensor by tensor: a bf16 model never exists in float32 whole
    return out


def random_module(build: Build, seed: int = 0, *, device="cpu", dtype: torch.dtype = torch.float32):
    """`build()` with `recipe_weights` (seeded), on `device` in `dtype`, eval mode, no grads."""
    return build_assigned(build, recipe_weights(meta_shapes(build), seed, dtype=dtype), device=device)

"""Conformance helpers: the golden weight recipe and the golden-file runner.

The golden files in tests/data were produced by the official MemFlow code with random weights
made by `recipe_weights`. `run_golden` replays any DiT golden file through the public API.
"""
from __future__ import annotations

import math

import torch


def recipe_weights(shapes: dict[str, list[int] | tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights made exactly as the golden files' recipe says.

    Names are drawn in sorted order, one `randn` per tensor from one generator, then scaled:
    modulation x0.1; 1-D norm weights 1 + 0.1 x; other 1-D tensors x0.02; matrices / sqrt(fan_in).
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
        out[name] = t
    return out

"""The process-wide torch settings of the speed modes, in one place, with their inverse.

    cudnn_benchmark   cuDNN times its convolution algorithms per shape and keeps the fastest
                      (the VAE's 3-D convolutions); off by default in PyTorch.
    recompile_limit   how many compiled variants torch.compile keeps per function: every block
                      of the DiT shares the same piece functions, so 30 blocks x a few shapes
                      need far more than PyTorch's default of 8.

`optimize_model` applies SPEED. `apply` returns the settings that were in force, so
`apply(previous)` undoes it; `applied(...)` does both around a block.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class TorchSettings:
    cudnn_benchmark: bool
    recompile_limit: int


SPEED = TorchSettings(cudnn_benchmark=True, recompile_limit=256)


def _limit_name() -> str:
    import torch._dynamo.config as dynamo_config

    # Renamed in PyTorch 2.6; the old name stays as an alias there.
    return "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"


def read() -> TorchSettings:
    """The settings in force now."""
    import torch._dynamo.config as dynamo_config

    return TorchSettings(torch.backends.cudnn.benchmark, getattr(dynamo_config, _limit_name()))


def apply(settings: TorchSettings) -> TorchSettings:
    """Put `settings` in force process-wide; returns the previous ones (apply them to undo)."""
    import torch._dynamo.config as dynamo_config

    previous = read()
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    setattr(dynamo_config, _limit_name(), settings.recompile_limit)
    return previous


@contextmanager
def applied(settings: TorchSettings = SPEED) -> Iterator[TorchSettings]:
    """`settings` in force while the block runs, the previous ones restored after it."""
    previous = apply(settings)
    try:
        yield previous
    finally:
        apply(previous)

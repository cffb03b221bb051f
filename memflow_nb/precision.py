"""Which floating-point type a device computes in, chosen from what the hardware does natively.

    choose_dtype("cuda")            # bf16 on compute capability >= 8.0, fp16 below (a T4 is 7.5)
    choose_dtype("cpu")             # float32: many CPUs emulate bf16 (no AVX512-BF16), 4-5x slower
    resolve_dtype("auto", device)   # what `load(dtype="auto")` does; an explicit dtype always wins

`torch.cuda.is_bf16_supported()` answers True on a T4 through emulation, so the capability is
what decides here.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

DtypeLike = Union[str, torch.dtype, None]

_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
BF16_CAPABILITY = (8, 0)  # Ampere and later have bf16 tensor cores


def cuda_capability(device: Union[str, torch.device]) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device, or None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def choose_dtype(device: Union[str, torch.device], capability: Optional[tuple[int, int]] = None) -> torch.dtype:
    """The compute dtype for `device`: bf16 on CUDA >= 8.0, fp16 on older CUDA, float32 elsewhere.

    capability: the CUDA compute capability, if already known (e.g. for a plan of another machine).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    capability = capability if capability is not None else cuda_capability(device)
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float16


def resolve_dtype(dtype: DtypeLike, device: Union[str, torch.device],
                  capability: Optional[tuple[int, int]] = None, *, name: str = "dtype") -> torch.dtype:
    """`dtype` as a torch.dtype: "auto" (or None) picks with `choose_dtype`; names like "fp16" are read."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return choose_dtype(device, capability)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{name}={dtype} is not a floating-point type; use 'auto', 'bf16', 'fp16' or 'fp32'")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in _NAMES:
        return _NAMES[dtype.strip().lower()]
    raise ValueError(f"{name}={dtype!r} is not a dtype; use 'auto', 'bf16', 'fp16', 'fp32' or a torch.dtype")

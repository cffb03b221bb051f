"""Reading weights files safely: torch pickles (weights only, memory-mapped) and safetensors.

Every `.pt`/`.pth` is read with `torch.load(weights_only=True, mmap=True)`: a pickle that would
run code is refused (there is no unsafe fallback). Empty files, Git LFS pointers, truncated
zips and safetensors headers that disagree with the file are named before anything is read.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .errors import SHOW, UnsafeCheckpoint, WeightsCorrupt, WeightsNotFound, listing, readme, redownload

__all__ = ["read_checkpoint", "read_safetensors", "safetensors_header", "tensors_only", "is_lfs_pointer"]

_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def is_lfs_pointer(head: bytes) -> bool:
    """Whether a file starting with `head` is a Git LFS pointer (text) instead of its content."""
    return head.startswith(_LFS_MAGIC)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a `.safetensors` file (flat dict of tensors) or a torch `.pt`/`.pth` pickle (any dict).

    Raises WeightsNotFound, WeightsCorrupt (truncated, bad header, Git LFS pointer) or
    UnsafeCheckpoint (the pickle would run code); every message names the file.
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (the folder {path.parent} does not exist)"
        raise WeightsNotFound(f"{path}: no such file{where}. memflow_nb.load downloads MemFlow's files; "
                              f"{readme('Which files')} for where each one comes from.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        raise WeightsCorrupt(f"{path} is empty. {redownload(path)}")
    if is_lfs_pointer(head):
        raise WeightsCorrupt(f"{path} is a Git LFS pointer ({size} bytes of text), not the weights: the repo "
                             "was cloned without git-lfs. Run `git lfs pull` in that clone, or download the "
                             f"file with `hf download` ({readme('Using a local copy')}).")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _read_torch(path, head)


def _read_torch(path: Path, head: bytes) -> dict:
    is_zip = zipfile.is_zipfile(path)
    if head.startswith(b"PK\x03\x04") and not is_zip:  # zip start present, central directory gone
        raise WeightsCorrupt(f"{path} is a truncated or damaged zip checkpoint. {redownload(path)}")
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
        called = [] if is_zip else _code_globals(path)
        if called:
            raise UnsafeCheckpoint(
                f"{path} refuses to load: unpickling it would call {', '.join(called)}, which a weights-only "
                "load does not allow (loading it unsafely could run arbitrary code). Use the official file "
                "from the hub, or convert a file you trust to safetensors yourself.") from None
        detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0] if msg else ""
        raise WeightsCorrupt(f"{path} is not a readable PyTorch checkpoint ({detail or type(e).__name__}); "
                             f"it may be corrupt or not a torch.save file. {redownload(path)}") from e
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsCorrupt(f"{path} could not be read ({type(e).__name__}: {str(e)[:200] or 'unexpected end'}); "
                             f"the file is probably truncated. {redownload(path)}") from e
    if not isinstance(obj, dict):
        raise WeightsCorrupt(f"{path} holds a {type(obj).__name__}, not a dict of tensors. Is it the right file?")
    return obj


# Globals a torch.save file of tensors may name; anything else (os.system, builtins.exec, ...) is code.
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray._reconstruct")


def _code_globals(path: Path) -> list[str]:
    """Callables a legacy pickle names outside the tensor-rebuilding ones (read with pickletools:
    nothing is executed). torch's weights-only reader can stop at an opcode (e.g. protocol 4's
    FRAME) before it sees them, so it alone would call such a file merely unreadable."""
    import pickletools

    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings = (strings + [arg])[-2:]
                elif op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
    except Exception:  # not a pickle at all: reported as unreadable by the caller
        return []
    return sorted({g for g in found if not g.startswith(_TENSOR_GLOBALS)})


def safetensors_header(path: Path) -> dict:
    """Parse and sanity-check the header (sizes and offsets) before safetensors maps the file."""
    size = path.stat().st_size

    def corrupt(why):
        return WeightsCorrupt(f"{path} is not a valid safetensors file: {why}. {redownload(path)}")
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
        raise corrupt("the header lies about tensor sizes:\n" + listing("bad entries", bad).rstrip())
    return header


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a checked safetensors file, on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise WeightsCorrupt(f"{path} could not be read by safetensors ({e}). {redownload(path)}") from e


def tensors_only(sd: Mapping, source, what: str) -> dict[str, Tensor]:
    """`sd` as a dict, or WeightsCorrupt naming its non-tensor entries."""
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsCorrupt(f"{source}: the {what} holds non-tensor entries {bad[:SHOW]}. Is it the right file?")
    return dict(sd)

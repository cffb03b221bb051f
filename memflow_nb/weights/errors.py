"""The errors a weights file can raise, and the README sections their messages point to."""
from __future__ import annotations

__all__ = ["CheckpointError", "WeightsNotFound", "WeightsCorrupt", "UnsafeCheckpoint", "KeyMismatch",
           "README_SECTIONS", "readme", "redownload", "listing"]

SHOW = 20  # names listed per kind in a message

# Every README.md heading a message may name (tests/test_weights.py checks that each exists).
README_SECTIONS = ("Weights", "Which files", "Using a local copy")


class CheckpointError(Exception):
    """Base of every error raised about a weights file."""


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


def readme(section: str) -> str:
    """'see the README, section "..."' for one of README_SECTIONS."""
    if section not in README_SECTIONS:
        raise ValueError(f"no README section {section!r} is known; add it to README_SECTIONS")
    return f'see the README, section "{section}"'


def redownload(path) -> str:
    return f"Delete {path} and download it again (memflow_nb.load fetches missing files; {readme('Weights')})."


def listing(title: str, items: list[str]) -> str:
    """'  N title (first 20 of N):' then one indented line per item (the first SHOW)."""
    shown = items[:SHOW]
    more = f" (first {SHOW} of {len(items)})" if len(items) > SHOW else ""
    return f"  {len(items)} {title}{more}:\n" + "".join(f"    {s}\n" for s in shown)

"""The prompt timeline: a validated, immutable model and its mapping onto chunks.

Time model (the frame arithmetic is in `memflow_nb.timeline.clock`)
----------
MemFlow generates the video one *chunk* at a time (``chunk_frames = 3`` latent frames); chunk ``k``
makes the video frames ``[max(0, 12k - 3), 12k + 9)`` at 16 fps: 9 frames for chunk 0, 12 for every
later one. A prompt can only change at a chunk start.

A timeline in ``unit="seconds"`` (Scope's unit) is mapped onto chunks like this: a segment that
starts at ``t`` seconds starts at the first chunk whose first video frame is ``>= round(t * 16)``
(rounding half up). The video ends at the first chunk boundary at or after the last segment's end,
so it always covers the requested duration. ``unit="chunks"`` gives chunk indices directly.
A segment stays active until the next one starts: a gap between segments extends the earlier
one, and the first segment also covers any time before its start. A segment shorter than a
chunk can round to zero chunks; it then never plays (``chunk_plan`` shows which segments do).

Transitions follow Scope's semantics: a segment with ``transition_steps = N > 0`` does not switch
at once; its first N chunks use ``N`` embeddings interpolated from the conditioning in effect just
before it to its own blend, at ``t = linspace(0, 1, N)``. The first of them equals the source, so
the conditioning first changes on the segment's second chunk and reaches the target on its N-th
chunk (N = 1 only delays the switch by one chunk). Two words for two things: a *segment start*
(`effective_switches`) and a *conditioning change* (a chunk whose conditioning differs from the one
before; `switch_summary` lists both).
The blending math and the per-chunk plan are in `memflow_nb.timeline.conditioning`; the file
formats in `memflow_nb.timeline.scope` and `memflow_nb.timeline.official`.
"""
from __future__ import annotations

import bisect
import json
import math
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, NamedTuple, Optional, Sequence, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .clock import CHUNK_FRAMES, chunk_of_time, time_of_chunk

MAX_TIME = 100_000  # upper bound on segment times (seconds or chunks): keeps plans finite and small
# Upper bound on segments, checked before any of them is validated, so that a hostile or generated
# file is refused at once (300,000 segments took 17 s to validate here; 10,000, by proportion, 0.6 s).
# 10,000 is a prompt every 0.75 s (one chunk) for two hours of video.
MAX_SEGMENTS = 10_000

Method = Literal["linear", "slerp"]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

class TimelineError(ValueError):
    """Invalid timeline or timeline file. ``errors`` lists ``(field path, message)`` pairs;
    ``validation_error`` is the underlying pydantic ``ValidationError`` when there is one."""

    def __init__(self, errors: Sequence[tuple[str, str]], validation_error: ValidationError | None = None):
        self.errors = [(str(p), str(m)) for p, m in errors]
        self.validation_error = validation_error
        super().__init__(f"invalid timeline ({len(self.errors)} error{'s' * (len(self.errors) != 1)}):\n"
                         + "\n".join(f"  {line}" for line in self.summary()))

    def summary(self, limit: int = 20) -> list[str]:
        """One "field: message" line per error, the first ``limit`` of them and then how many more
        (a hostile file can hold hundreds of thousands)."""
        lines = [f"{p}: {m}" if p else m for p, m in self.errors[:limit]]
        if len(self.errors) > limit:
            lines.append(f"... and {len(self.errors) - limit} more errors")
        return lines

    @classmethod
    def from_pydantic(cls, err: ValidationError, rename: Callable[[tuple], tuple] = lambda loc: loc,
                      prefix: tuple = ()) -> "TimelineError":
        """Flatten a pydantic error; ``rename`` maps our field names to a file format's names."""
        out = []
        for e in err.errors():
            loc = tuple(e["loc"])
            # Cross-field checks report several problems in one pydantic error (see _cross_check).
            for sub_loc, msg in (e.get("ctx") or {}).get("problems", [(loc, e["msg"])]):
                msg = msg.removeprefix("Value error, ")  # pydantic's prefix for our own ValueErrors
                out.append((_path(prefix + rename(tuple(sub_loc))), msg))
        return cls(out, err)


def _path(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc)


def _not_blank(s: str) -> str:
    if not s.strip():
        raise ValueError("prompt text is empty or whitespace only")
    return s


def too_many_segments(items: Any) -> str | None:
    """Why ``items`` holds too many segments to validate (over `MAX_SEGMENTS`), or None."""
    if isinstance(items, (list, tuple)) and len(items) > MAX_SEGMENTS:
        return (f"{len(items):,} segments; at most {MAX_SEGMENTS:,} are accepted "
                "(one per chunk for two hours of video)")
    return None


def _non_empty(items: tuple) -> tuple:
    # A length check after item validation; Field(min_length=...) would also fire, confusingly,
    # when the items are present but invalid.
    if not items:
        raise ValueError("must not be empty")
    return items


def _descending(steps: tuple[int, ...]) -> tuple[int, ...]:
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising steps must be strictly decreasing, got {list(steps)}")
    return steps


def _multiple_of_16(v: int) -> int:
    # The VAE downsamples by 8 and the DiT patches 2x2, so a pixel side must tile into 16s.
    if v % 16:
        raise ValueError(f"{v} is not divisible by 16")
    return v


Text = Annotated[str, Field(strict=True), AfterValidator(_not_blank)]
Weight = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Time = Annotated[float, Field(strict=True, ge=0, le=MAX_TIME, allow_inf_nan=False)]
Side = Annotated[int, Field(strict=True, gt=0, le=16384), AfterValidator(_multiple_of_16)]
Step = Annotated[int, Field(strict=True, ge=1, le=1000)]


_depth = threading.local()  # how many model validations are in progress on this thread


@contextmanager
def as_timeline_error(rename: Callable[[tuple], tuple] = lambda loc: loc) -> Iterator[None]:
    """Turn a ValidationError into TimelineError, in the outermost validation only: pydantic calls
    our custom __init__ for nested models too, and converting there would flatten the nested
    errors into one opaque message instead of one entry per field."""
    n = getattr(_depth, "n", 0)
    _depth.n = n + 1
    try:
        yield
    except ValidationError as e:
        if n == 0:
            raise TimelineError.from_pydantic(e, rename) from e
        raise
    finally:
        _depth.n = n


class _Model(BaseModel):
    """Frozen, no unknown fields, and every validation failure surfaces as TimelineError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any):
        with as_timeline_error():
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any):
        with as_timeline_error():
            return super().model_validate(obj, **kw)

    @classmethod
    def model_validate_json(cls, data: Any, **kw: Any):
        with as_timeline_error():
            return super().model_validate_json(data, **kw)

    def replace(self, **changes: Any):
        """A validated copy with some fields changed (``model_copy`` would skip validation)."""
        return type(self)(**{**{k: getattr(self, k) for k in type(self).model_fields}, **changes})


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class WeightedPrompt(_Model):
    """One prompt text and its blend weight (only ratios matter: weights are normalised)."""

    text: Text
    weight: Weight = 1.0

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, v: Any) -> Any:
        return {"text": v} if isinstance(v, str) else v  # notebook shorthand: a bare string


class Segment(_Model):
    """A span ``[start, end)`` (in the timeline's unit) with a weighted prompt blend.

    ``transition_steps``: chunks spent interpolating into this segment (None or 0: hard switch).
    ``transition_method``: how to interpolate (None: slerp, Scope's default for MemFlow).
    """

    start: Time
    end: Time
    prompts: tuple[WeightedPrompt, ...]
    transition_steps: Optional[Annotated[int, Field(strict=True, ge=0, le=MAX_TIME)]] = None
    transition_method: Optional[Method] = None

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")  # absent when start itself failed
        if start is not None and end <= start:
            raise ValueError(f"end ({end}) must be greater than start ({start})")
        return end

    @field_validator("prompts")
    @classmethod
    def _some_weight(cls, prompts: tuple[WeightedPrompt, ...]) -> tuple[WeightedPrompt, ...]:
        _non_empty(prompts)
        try:
            total = math.fsum(p.weight for p in prompts)
        except OverflowError:  # finite weights whose sum is not (1e308 + 1e308)
            total = math.inf
        if not total > 0:
            raise ValueError("all prompt weights are zero; at least one must be positive")
        if not math.isfinite(total):
            raise ValueError("prompt weights sum to infinity")
        return prompts


class Switch(NamedTuple):
    """Where a segment really starts: requested start (timeline unit) vs effective chunk."""

    segment: int
    requested_start: float
    chunk: int
    time: float  # seconds of video at which that chunk's first frame is shown


class ScopeOrigin(_Model):
    """What a Scope timeline file held beyond the timeline, written back unchanged on export.

    ``version``: the file's version ("1.0", "2.0" or "2.1"). ``settings``: the settings a Timeline does
    not model (pipelineId, manageCache, quantization, noiseScale, loras, loraMergeStrategy, ...), as
    read. ``extra``: top-level keys other than version, exportedAt, prompts and settings.
    """

    version: str = "2.1"
    settings: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def __hash__(self) -> int:  # dicts are unhashable; a Timeline stays hashable
        return hash(json.dumps([self.version, self.settings, self.extra], sort_keys=True, default=repr))


class Timeline(_Model):
    """A validated, immutable prompt timeline.

    ``segments``: ordered, non-overlapping (gaps allowed, see module doc). ``unit``: "seconds"
    (video time at 16 fps) or "chunks" (integer chunk indices). ``seed``, ``height``, ``width``,
    ``denoising_steps``: optional generation settings (None: use the stream's own). ``scope``: what
    the Scope file it was read from held beyond these (None: a MemFlow file holding nothing more,
    or a timeline made here); `to_scope_json` writes it back unchanged.
    """

    segments: Annotated[tuple[Segment, ...], AfterValidator(_non_empty)]
    unit: Literal["seconds", "chunks"] = "seconds"
    seed: Optional[Annotated[int, Field(strict=True, ge=0, lt=2**63)]] = None
    height: Optional[Side] = None
    width: Optional[Side] = None
    denoising_steps: Optional[Annotated[tuple[Step, ...], AfterValidator(_non_empty), AfterValidator(_descending)]] = None
    scope: Optional[ScopeOrigin] = None

    @model_validator(mode="before")
    @classmethod
    def _not_too_many_segments(cls, data: Any) -> Any:
        # Before any segment is validated: a hostile file is refused at once.
        why = too_many_segments(data.get("segments")) if isinstance(data, dict) else None
        if why:
            raise PydanticCustomError("timeline", why, {"problems": [(("segments",), why)]})
        return data

    @model_validator(mode="after")
    def _cross_check(self) -> "Timeline":
        # Checks that span fields. All problems go into one pydantic error (a validator can only
        # raise one); TimelineError.from_pydantic expands them into one entry per field path.
        problems = []
        for i in range(1, len(self.segments)):
            prev, seg = self.segments[i - 1], self.segments[i]
            if seg.start < prev.end:
                problems.append((("segments", i, "start"),
                                 f"starts at {seg.start}, before segment {i - 1} ends ({prev.end})"))
        if self.unit == "chunks":
            for i, seg in enumerate(self.segments):
                for name in ("start", "end"):
                    if not float(getattr(seg, name)).is_integer():
                        problems.append((("segments", i, name), "must be a whole chunk index when unit='chunks'"))
        if (self.height is None) != (self.width is None):
            missing = "width" if self.width is None else "height"
            problems.append(((missing,), "height and width must be given together"))
        if problems:
            raise PydanticCustomError("timeline", "{n} cross-field problem(s)", {"n": len(problems), "problems": problems})
        return self

    # -- chunk mapping ---------------------------------------------------------------------

    def _chunk(self, value: float, chunk_frames: int) -> int:
        return int(value) if self.unit == "chunks" else chunk_of_time(value, chunk_frames)

    def _start_chunks(self, chunk_frames: int) -> list[int]:
        # The first segment always owns chunk 0 (time before its start uses it too).
        return [0] + [self._chunk(s.start, chunk_frames) for s in self.segments[1:]]

    def chunk_plan(self, chunk_frames: int = CHUNK_FRAMES) -> tuple[int, ...]:
        """Active segment index per chunk: a tuple of length ``num_chunks``.

        When several segments round to the same start chunk, the last one wins (the others never play).
        """
        starts = self._start_chunks(chunk_frames)
        n = max(1, self._chunk(self.segments[-1].end, chunk_frames))
        return tuple(bisect.bisect_right(starts, k) - 1 for k in range(n))

    @property
    def num_chunks(self) -> int:
        """Chunks (of ``CHUNK_FRAMES`` latent frames) needed to play the whole timeline."""
        return len(self.chunk_plan())

    def effective_switches(self, chunk_frames: int = CHUNK_FRAMES) -> list[Switch]:
        """One ``Switch(segment, requested_start, chunk, time)`` per segment.

        A segment whose chunk equals the next segment's chunk (or ``num_chunks``) never plays.
        """
        return [Switch(i, seg.start, c, time_of_chunk(c, chunk_frames))
                for i, (seg, c) in enumerate(zip(self.segments, self._start_chunks(chunk_frames)))]

    def switch_summary(self, num_chunks: Optional[int] = None, chunk_frames: int = CHUNK_FRAMES) -> str:
        """"segments start at chunks [...]; conditioning changes at chunks [...]": where segments begin,
        and which chunks get a new text conditioning (not the same with transitions); see
        `memflow_nb.timeline.conditioning.switch_summary`. Needs torch."""
        from .conditioning import switch_summary

        return switch_summary(self, num_chunks, chunk_frames)

    # -- Scope timeline JSON (memflow_nb.timeline.scope) -------------------------------------

    @classmethod
    def from_scope_json(cls, source: Union[dict, str, Path]) -> "Timeline":
        """Read a Scope timeline (versions 1.0-2.1): a dict, JSON text (starting with '{') or a file path.

        UI-only block keys (id, isLive, color) and unknown settings are ignored; a block without
        ``prompts`` falls back to its ``text`` (weight 1). Error paths use Scope's names.
        """
        from .scope import read_scope_json

        return read_scope_json(source)

    def to_scope_json(self, path: Union[str, Path, None] = None, exported_at: str | None = None,
                      chunk_frames: int = CHUNK_FRAMES) -> dict:
        """A version "2.1" Scope timeline dict (also written to ``path`` if given).

        Chunk-unit timelines are written in seconds (each boundary at its chunk's first frame), which
        reads back as a seconds timeline with the same ``chunk_plan``.
        """
        from .scope import write_scope_json

        return write_scope_json(self, path, exported_at, chunk_frames)

    def scope_loras(self, lora_dir: Union[str, Path, None] = None) -> list[tuple[str, float]]:
        """The user LoRAs of the Scope file this was read from, ``[(path, scale), ...]``, ready for
        ``memflow_nb.load(..., loras=timeline.scope_loras())`` ([] when the file named none).

        ``lora_dir``: a folder holding the LoRAs on this machine (Scope writes absolute paths of the
        machine that made the file); see `memflow_nb.user_lora.loras_from_scope_settings`.
        """
        from ..user_lora import loras_from_scope_settings

        return loras_from_scope_settings(self.scope.settings if self.scope else {}, lora_dir=lora_dir)

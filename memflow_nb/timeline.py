"""Prompt timelines: a validated model, Scope / official MemFlow file formats and chunk-exact switch
points. The blending / transition math and the per-chunk conditioning plan are in
`memflow_nb.conditioning`.

Time model
----------
MemFlow generates the video one *chunk* at a time (``chunk_frames = 3`` latent frames). The VAE turns
latent frame 0 into 1 video frame and every later latent frame into 4, so with 3-frame chunks chunk
``k`` produces the video frames ``[max(0, 12k - 3), 12k + 9)`` at 16 fps: 9 frames for chunk 0, 12 for
every later one. A prompt can only change at a chunk start.

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
the target is reached on the segment's N-th chunk (N = 1 only delays the switch by one chunk).
"""
from __future__ import annotations

import bisect
import json
import math
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, NamedTuple, Optional, Sequence, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .engine.config import StreamConfig

FPS = 16  # video frames per second of Wan2.1 / MemFlow output
CHUNK_FRAMES = StreamConfig.chunk_frames  # latent frames per chunk (3, MemFlow's num_frame_per_block)
MAX_TIME = 100_000  # upper bound on segment times (seconds or chunks): keeps plans finite and small
SCOPE_VERSIONS = ("1.0", "2.0", "2.1")

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
        lines = "\n".join(f"  {p or '(root)'}: {m}" for p, m in self.errors)
        super().__init__(f"invalid timeline ({len(self.errors)} error{'s' * (len(self.errors) != 1)}):\n{lines}")

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
def _as_timeline_error(rename: Callable[[tuple], tuple] = lambda loc: loc) -> Iterator[None]:
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
        with _as_timeline_error():
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any):
        with _as_timeline_error():
            return super().model_validate(obj, **kw)

    @classmethod
    def model_validate_json(cls, data: Any, **kw: Any):
        with _as_timeline_error():
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
        total = math.fsum(p.weight for p in prompts)
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


class Timeline(_Model):
    """A validated, immutable prompt timeline.

    ``segments``: ordered, non-overlapping (gaps allowed, see module doc). ``unit``: "seconds"
    (video time at 16 fps) or "chunks" (integer chunk indices). ``seed``, ``height``, ``width``,
    ``denoising_steps``: optional generation settings (None: use the stream's own).
    """

    segments: Annotated[tuple[Segment, ...], AfterValidator(_non_empty)]
    unit: Literal["seconds", "chunks"] = "seconds"
    seed: Optional[Annotated[int, Field(strict=True, ge=0, lt=2**63)]] = None
    height: Optional[Side] = None
    width: Optional[Side] = None
    denoising_steps: Optional[Annotated[tuple[Step, ...], AfterValidator(_non_empty), AfterValidator(_descending)]] = None

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

    # -- Scope legacy timeline JSON ----------------------------------------------------------

    @classmethod
    def from_scope_json(cls, source: Union[dict, str, Path]) -> "Timeline":
        """Read a Scope timeline (versions 1.0-2.1): a dict, JSON text (starting with '{') or a file path.

        UI-only block keys (id, isLive, color) and unknown settings are ignored; a block without
        ``prompts`` falls back to its ``text`` (weight 1). Error paths use Scope's names.
        """
        data = _load_json(source)
        try:
            doc = _ScopeFile.model_validate(data)
        except ValidationError as e:
            raise TimelineError.from_pydantic(e) from e
        s = doc.settings or _ScopeSettings()
        fallback, segments = set(), []
        for i, b in enumerate(doc.prompts):
            seg = {"start": b.startTime, "end": b.endTime, "transition_steps": b.transitionSteps,
                   "transition_method": b.temporalInterpolationMethod}
            if b.prompts:
                seg["prompts"] = [p.model_dump() for p in b.prompts]
            elif b.text is not None:
                fallback.add(i)
                seg["prompts"] = [{"text": b.text, "weight": 1.0}]
            elif b.prompts is not None:
                seg["prompts"] = []  # reported as empty; a missing key is reported as required
            segments.append(seg)
        seed, seed_loc = s.seed, ("settings", "seed")
        if seed is None and s.schemaFieldOverrides and "base_seed" in s.schemaFieldOverrides:
            seed, seed_loc = s.schemaFieldOverrides["base_seed"], ("settings", "schemaFieldOverrides", "base_seed")
        fields = {"segments": segments, "unit": "seconds", "seed": seed,
                  "height": s.resolution.height if s.resolution else None,
                  "width": s.resolution.width if s.resolution else None,
                  "denoising_steps": s.denoisingSteps}
        with _as_timeline_error(lambda loc: _scope_loc(loc, fallback, seed_loc)):
            return super().model_validate(fields)

    def to_scope_json(self, path: Union[str, Path, None] = None, exported_at: str | None = None,
                      chunk_frames: int = CHUNK_FRAMES) -> dict:
        """A version "2.1" Scope timeline dict (also written to ``path`` if given).

        Chunk-unit timelines are written in seconds (each boundary at its chunk's first frame), which
        reads back as a seconds timeline with the same ``chunk_plan``.
        """
        def secs(v: float) -> float:
            return time_of_chunk(int(v), chunk_frames) if self.unit == "chunks" else v

        blocks = []
        for seg in self.segments:
            b = {"startTime": secs(seg.start), "endTime": secs(seg.end),
                 "prompts": [{"text": p.text, "weight": p.weight} for p in seg.prompts]}
            if seg.transition_steps is not None:
                b["transitionSteps"] = seg.transition_steps
            if seg.transition_method is not None:
                b["temporalInterpolationMethod"] = seg.transition_method
            blocks.append(b)
        settings: dict[str, Any] = {"pipelineId": "memflow"}
        if self.height is not None:
            settings["resolution"] = {"height": self.height, "width": self.width}
        if self.seed is not None:
            settings["seed"] = self.seed
        if self.denoising_steps is not None:
            settings["denoisingSteps"] = list(self.denoising_steps)
        doc = {"version": "2.1", "exportedAt": exported_at or datetime.now(timezone.utc).isoformat(),
               "prompts": blocks, "settings": settings}
        if path is not None:
            Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return doc


# Scope file layer: only the shape and the keys that our Timeline does not hold are checked here;
# leaf values are handed to Timeline so each rule lives in one place.

class _ScopeModel(BaseModel):
    model_config = ConfigDict(extra="ignore")  # drops UI-only keys (id, isLive, color, ...)


class _ScopePrompt(_ScopeModel):
    text: Any
    weight: Any


class _ScopeBlock(_ScopeModel):
    startTime: Any
    endTime: Any
    prompts: Optional[list[_ScopePrompt]] = None
    text: Any = None
    transitionSteps: Any = None
    temporalInterpolationMethod: Any = None


class _ScopeResolution(_ScopeModel):
    height: Any
    width: Any


class _ScopeSettings(_ScopeModel):
    resolution: Optional[_ScopeResolution] = None
    seed: Any = None
    denoisingSteps: Any = None
    schemaFieldOverrides: Optional[dict[str, Any]] = None


class _ScopeFile(_ScopeModel):
    version: Literal[SCOPE_VERSIONS]
    exportedAt: Optional[Annotated[str, Field(strict=True)]] = None
    prompts: list[_ScopeBlock]
    settings: Optional[_ScopeSettings] = None


_SCOPE_BLOCK_KEYS = {"start": "startTime", "end": "endTime", "transition_steps": "transitionSteps",
                     "transition_method": "temporalInterpolationMethod"}
_SCOPE_SETTING_LOCS = {"height": ("settings", "resolution", "height"),
                       "width": ("settings", "resolution", "width"),
                       "denoising_steps": ("settings", "denoisingSteps")}


def _scope_loc(loc: tuple, fallback: set[int], seed_loc: tuple) -> tuple:
    """Timeline field path -> the Scope JSON path the value came from."""
    if not loc:
        return loc
    head, rest = loc[0], loc[1:]
    if head == "segments":
        if len(rest) < 2:
            return ("prompts",) + rest
        i, name, rest = rest[0], rest[1], rest[2:]
        if name == "prompts" and i in fallback:
            return ("prompts", i, "text")
        return ("prompts", i, _SCOPE_BLOCK_KEYS.get(name, name)) + rest
    if head == "seed":
        return seed_loc + rest
    return _SCOPE_SETTING_LOCS.get(head, (head,)) + rest


def _load_json(source: Union[dict, str, Path]) -> Any:
    # JSON text, a file path, or already-parsed data (anything else is left to validation).
    if isinstance(source, str) and source.lstrip().startswith("{"):
        text = source
    elif isinstance(source, (str, Path)):
        text = Path(source).read_text(encoding="utf-8")
    else:
        return source
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TimelineError([("", f"not valid JSON: {e}")]) from e


# ----------------------------------------------------------------------------------------------
# Chunk / time helpers and the official switch rule
# ----------------------------------------------------------------------------------------------

def chunk_video_frames(chunk: int, chunk_frames: int = CHUNK_FRAMES) -> tuple[int, int]:
    """Video frames ``[start, stop)`` produced by ``chunk`` (latent 0 -> 1 frame, others -> 4 each)."""
    first_latent, end_latent = chunk * chunk_frames, (chunk + 1) * chunk_frames
    return max(0, 4 * first_latent - 3), 4 * end_latent - 3


def time_of_chunk(chunk: int, chunk_frames: int = CHUNK_FRAMES) -> float:
    """Seconds at which ``chunk``'s first video frame is shown."""
    return chunk_video_frames(chunk, chunk_frames)[0] / FPS


def chunk_of_time(seconds: float, chunk_frames: int = CHUNK_FRAMES) -> int:
    """First chunk whose first video frame index is ``>= round(seconds * 16)`` (half rounds up)."""
    frame = math.floor(seconds * FPS + 0.5)
    if frame <= 0:
        return 0
    # Chunk k >= 1 starts at video frame 4*k*chunk_frames - 3.
    return -(-(frame + 3) // (4 * chunk_frames))


def official_switch_chunks(switch_frame_indices: Sequence[int], num_chunks: int,
                           chunk_frames: int = CHUNK_FRAMES) -> list[int]:
    """The official MemFlow switch rule: chunk index at which each switch happens.

    Before chunk ``c`` (start latent frame ``s = c * chunk_frames``) the pipeline advances one
    segment if ``s >= next index`` (at most one advance per chunk) and then takes the next index.
    Switches not reached within ``num_chunks`` are omitted. Returns a list of length <= len(indices).
    """
    out: list[int] = []
    for c in range(num_chunks):
        if len(out) < len(switch_frame_indices) and c * chunk_frames >= switch_frame_indices[len(out)]:
            out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Official MemFlow JSONL
# ----------------------------------------------------------------------------------------------

def _count_matches(prompts: list[str], info: ValidationInfo) -> list[str]:
    n = (info.context or {}).get("n")
    if n is not None and len(prompts) != n:
        raise ValueError(f"has {len(prompts)} prompts; len(switch_frame_indices) + 1 = {n} expected")
    return prompts


class _OfficialLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompts: Annotated[list[Text], AfterValidator(_count_matches)]


_LINES = TypeAdapter(list[_OfficialLine])
_SWITCHES = TypeAdapter(list[Annotated[int, Field(strict=True, ge=1)]])
_COUNT = TypeAdapter(Annotated[int, Field(strict=True, ge=1, le=MAX_TIME)])


class OfficialJsonl(NamedTuple):
    """What the official pipeline needs: JSONL lines plus its global YAML timing keys."""

    lines: list[str]
    switch_frame_indices: list[int]
    num_latent_frames: int


def _read_lines(source: Union[str, Path, Iterable[str]]) -> list[str]:
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        source = Path(source).read_text(encoding="utf-8").splitlines()
    elif isinstance(source, str):
        source = source.splitlines()
    return [ln for ln in source if ln.strip()]


def from_official_jsonl(source: Union[str, Path, Iterable[str]], switch_frame_indices: Sequence[int], *,
                        num_latent_frames: int | None = None, num_chunks: int | None = None,
                        chunk_frames: int = CHUNK_FRAMES, **settings: Any) -> list[Timeline]:
    """Official MemFlow prompts -> one chunk-unit Timeline per JSONL line.

    ``source``: a path, JSONL text (starting with '{') or an iterable of lines, each
    ``{"prompts": [str, ...]}`` with ``len(switch_frame_indices) + 1`` prompts. Give exactly one of
    ``num_latent_frames`` (the YAML's ``num_output_frames``, a multiple of ``chunk_frames``) or
    ``num_chunks``. Switch chunks follow ``official_switch_chunks``; every switch must be reached.
    ``settings`` (seed, height, width, denoising_steps) are passed to each Timeline.
    """
    errors = []
    if (num_latent_frames is None) == (num_chunks is None):
        raise TimelineError([("num_chunks", "give exactly one of num_latent_frames and num_chunks")])
    name, count = ("num_chunks", num_chunks) if num_chunks is not None else ("num_latent_frames", num_latent_frames)
    try:
        count = _COUNT.validate_python(count)
        if name == "num_latent_frames" and count % chunk_frames:
            errors.append((name, f"{count} is not a multiple of chunk_frames={chunk_frames}"))
        n_chunks = count if name == "num_chunks" else count // chunk_frames
    except ValidationError as e:
        errors += TimelineError.from_pydantic(e, prefix=(name,)).errors
    try:
        indices = _SWITCHES.validate_python(list(switch_frame_indices))
    except ValidationError as e:
        errors += TimelineError.from_pydantic(e, prefix=("switch_frame_indices",)).errors
    if errors:
        raise TimelineError(errors)
    switches = official_switch_chunks(indices, n_chunks, chunk_frames)
    if len(switches) < len(indices):
        raise TimelineError([(f"switch_frame_indices.{len(switches)}",
                              f"{indices[len(switches)]} is never reached within {n_chunks} chunks")])

    rows = []
    for i, line in enumerate(_read_lines(source)):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            errors.append((f"lines.{i}", f"not valid JSON: {e}"))
    if errors:
        raise TimelineError(errors)
    try:
        parsed = _LINES.validate_python(rows, context={"n": len(indices) + 1})
    except ValidationError as e:
        raise TimelineError.from_pydantic(e, prefix=("lines",)) from e
    bounds = [0] + switches + [n_chunks]
    return [Timeline(segments=[{"start": bounds[j], "end": bounds[j + 1], "prompts": [text]}
                               for j, text in enumerate(row.prompts)], unit="chunks", **settings)
            for row in parsed]


def to_official_jsonl(timelines: Sequence[Timeline], path: Union[str, Path, None] = None,
                      chunk_frames: int = CHUNK_FRAMES) -> OfficialJsonl:
    """Timelines -> official JSONL lines, ``switch_frame_indices`` and ``num_latent_frames``.

    The official format holds one unweighted prompt per segment, hard switches, and one global
    switch schedule, so every timeline must have single-prompt segments, no transitions, and the same
    effective switch chunks; settings (seed, resolution) belong in the YAML and are not written.
    Indices are written as chunk start frames, so reading them back gives the same switch chunks.
    """
    errors, schedules, lines = [], [], []
    for t, tl in enumerate(timelines):
        plan = tl.chunk_plan(chunk_frames)
        played = sorted(set(plan))
        for i, seg in enumerate(tl.segments):
            loc = f"timelines.{t}.segments.{i}"
            if len(seg.prompts) != 1:
                errors.append((f"{loc}.prompts", "the official format holds exactly one prompt per segment"))
            if seg.transition_steps:
                errors.append((f"{loc}.transition_steps", "the official format has no transitions"))
            if i not in played:
                errors.append((f"{loc}.start", "segment rounds to zero chunks; the official format cannot skip it"))
        schedules.append(([k for k in range(1, len(plan)) if plan[k] != plan[k - 1]], len(plan)))
        lines.append(json.dumps({"prompts": [seg.prompts[0].text for seg in tl.segments]}, ensure_ascii=False))
    if not timelines:
        errors.append(("timelines", "no timelines given"))
    for t, sched in enumerate(schedules[1:], 1):
        if sched != schedules[0]:
            errors.append((f"timelines.{t}", "switch chunks or length differ from timelines.0; "
                                             "the official format has one global schedule"))
    if errors:
        raise TimelineError(errors)
    switch_chunks, n = schedules[0]
    out = OfficialJsonl(lines, [c * chunk_frames for c in switch_chunks], n * chunk_frames)
    if path is not None:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

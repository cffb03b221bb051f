"""Official MemFlow prompt files: JSONL lines of ``{"prompts": [...]}`` plus a global list of
switch frame indices (the YAML's ``switch_frame_indices``), to and from chunk-unit Timelines.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Iterable, NamedTuple, Sequence, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo

from .clock import CHUNK_FRAMES
from .model import MAX_TIME, Text, Timeline, TimelineError

DEFAULT_SWITCHES = (40, 80, 120, 160, 200)  # the official interactive config (latent frames)
DEFAULT_OFFICIAL_LATENT_FRAMES = 240  # its video length in latent frames (60 s)


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
        source = Path(source).read_text(encoding="utf-8-sig").splitlines()
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
    else:
        for k, (a, b) in enumerate(zip(indices, indices[1:])):
            if b <= a:  # unsorted or repeated: a segment would play for one chunk or none
                errors.append((f"switch_frame_indices.{k + 1}", f"{b} must be greater than the switch before it "
                                                                f"({a}): list the switch frames in increasing order"))
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
        except RecursionError:
            errors.append((f"lines.{i}", "nested too deeply to read"))
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
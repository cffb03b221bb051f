"""Scope timeline JSON (versions 1.0-2.1): read into a `Timeline`, write version 2.1.

Only the file's shape and the keys that a Timeline does not hold are checked here; leaf values are
handed to Timeline so each rule lives in one place, and errors are reported with Scope's key names.

Round trips lose nothing at the file level: the settings a Timeline does not model (pipelineId,
manageCache, quantization, noiseScale, loras, ...), other top-level keys and the version are kept in
`Timeline.scope` and written back unchanged. Block-level UI keys (id, isLive, color) are not kept.
"""
from __future__ import annotations

import copy
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .clock import CHUNK_FRAMES, time_of_chunk
from .model import ScopeOrigin, Timeline, TimelineError, as_timeline_error, too_many_segments

SCOPE_VERSIONS = ("1.0", "2.0", "2.1")
PIPELINE_ID = "memflow"  # Scope's id for this model; files for other pipelines load with a warning
MODELLED_SETTINGS = ("resolution", "seed", "denoisingSteps")  # the settings a Timeline holds
_FILE_KEYS = ("version", "exportedAt", "prompts", "settings")


def read_scope_json(source: Union[dict, str, Path]) -> Timeline:
    """A Scope timeline (dict, JSON text starting with '{', or a file path) as a seconds-unit Timeline.

    UI-only block keys (id, isLive, color) and unknown settings are ignored; a block without
    ``prompts`` falls back to its ``text`` (weight 1). Error paths use Scope's names.
    """
    data = _load_json(source)
    why = too_many_segments(data.get("prompts")) if isinstance(data, dict) else None
    if why:
        raise TimelineError([("prompts", why)])  # before any block is validated
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
    fields["scope"] = _origin(data)
    with as_timeline_error(lambda loc: _scope_loc(loc, fallback, seed_loc)):
        timeline = Timeline.model_validate(fields)
    _warn_other_pipeline(source, data)
    return timeline


def _origin(data: dict) -> ScopeOrigin | None:
    """The file's version, unmodelled settings and other top-level keys (None: nothing beyond a
    version 2.1 MemFlow file, which is what `write_scope_json` makes without an origin)."""
    settings = data.get("settings") or {}
    kept = {k: copy.deepcopy(v) for k, v in settings.items() if k not in MODELLED_SETTINGS}
    extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in _FILE_KEYS}
    if data["version"] == "2.1" and kept in ({}, {"pipelineId": PIPELINE_ID}) and not extra:
        return None
    return ScopeOrigin(version=data["version"], settings=kept, extra=extra)


def _warn_other_pipeline(source: Any, data: dict) -> None:
    settings = data.get("settings") or {}
    pipeline = settings.get("pipelineId")
    if pipeline in (None, PIPELINE_ID):
        return
    name = source.name if isinstance(source, Path) else "timeline" if isinstance(source, dict) or \
        str(source).lstrip().startswith("{") else Path(source).name
    used = ["prompts", "times", "transitions"] + [k for k in MODELLED_SETTINGS if k in settings]
    if "schemaFieldOverrides" in settings and "seed" not in settings:
        used.append("schemaFieldOverrides.base_seed")
    ignored = [k for k in settings if k not in MODELLED_SETTINGS and k != "pipelineId"]
    warnings.warn(f"{name} was made for Scope's {pipeline!r} pipeline, not {PIPELINE_ID!r}: using "
                  f"{', '.join(used)}; ignoring {', '.join(ignored) or 'nothing else'} "
                  "(kept and written back on export)", stacklevel=3)


def write_scope_json(timeline: Timeline, path: Union[str, Path, None] = None, exported_at: str | None = None,
                     chunk_frames: int = CHUNK_FRAMES) -> dict:
    """``timeline`` as a Scope dict (also written to ``path`` if given): version "2.1", or the version
    and the unmodelled settings of the file it was read from (``timeline.scope``), unchanged.

    Chunk-unit timelines are written in seconds (each boundary at its chunk's first frame), which
    reads back as a seconds timeline with the same ``chunk_plan``.
    """
    def secs(v: float) -> float:
        return time_of_chunk(int(v), chunk_frames) if timeline.unit == "chunks" else v

    blocks = []
    for seg in timeline.segments:
        b = {"startTime": secs(seg.start), "endTime": secs(seg.end),
             "prompts": [{"text": p.text, "weight": p.weight} for p in seg.prompts]}
        if seg.transition_steps is not None:
            b["transitionSteps"] = seg.transition_steps
        if seg.transition_method is not None:
            b["temporalInterpolationMethod"] = seg.transition_method
        blocks.append(b)
    origin = timeline.scope or ScopeOrigin(settings={"pipelineId": PIPELINE_ID})
    settings: dict[str, Any] = copy.deepcopy(origin.settings)
    if timeline.height is not None:
        settings["resolution"] = {"height": timeline.height, "width": timeline.width}
    overrides = settings.get("schemaFieldOverrides")
    if timeline.seed is not None:
        if isinstance(overrides, dict) and "base_seed" in overrides:
            overrides["base_seed"] = timeline.seed  # the seed stays where the file had it
        else:
            settings["seed"] = timeline.seed
    if timeline.denoising_steps is not None:
        settings["denoisingSteps"] = list(timeline.denoising_steps)
    doc = {"version": origin.version, "exportedAt": exported_at or datetime.now(timezone.utc).isoformat(),
           "prompts": blocks, "settings": settings, **copy.deepcopy(origin.extra)}
    if path is not None:
        Path(path).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return doc


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
        text = Path(source).read_text(encoding="utf-8-sig")  # a BOM is what Windows editors write
    else:
        return source
    try:
        return json.loads(text)
    except RecursionError:
        raise TimelineError([("", "nested too deeply to read (a timeline is a few levels deep)")]) from None
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if e.msg == "Extra data" and len(lines) > 1 and all(ln.lstrip().startswith("{") for ln in lines):
            raise TimelineError([("", "looks like JSON Lines (one object per line), the official MemFlow "
                                      "prompt format: name the file .jsonl")]) from None
        raise TimelineError([("", f"not valid JSON: {e}")]) from e

"""What a study runs: stories read from prompt files, a grid of stream settings, seeds, and the
runs they make, sharded over ranks.

One run is one (story, setting, seed). Everything here is plain data and deterministic, so every
rank of a distributed study derives the same plan and the same shard from the same arguments.

Settings grammar (``--settings``):

* ``bank_size=0,3;sma=off,on``: a grid, the product of every ``field=value,value`` part (4 runs
  per story and seed here). Fields are `StreamConfig` fields; booleans read on/off, true/false,
  yes/no, 1/0; a step list is written with slashes (``denoising_steps=1000/750/500/250``).
* ``off:bank_size=0 | on: | sma:sma=on``: a union of grids separated by ``|``, each with an
  optional ``NAME:`` prefix (an empty body is the pipeline's own settings).
* ``settings.json``: a file holding ``{"NAME": {"field": value, ...}, ...}`` (or a list of such
  dicts, named from their fields).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .engine.config import StreamConfig

_BOOLS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


class StudyInputError(ValueError):
    """A problem with the study's arguments (settings, seeds, input paths): stops the study before any run."""


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A named variant of the stream settings: `overrides` ((field, value), ...) on top of the pipeline's."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """The name as it appears in run ids and file names."""
        return _SAFE.sub("-", self.name).strip("-") or "default"

    def apply(self, stream: StreamConfig) -> StreamConfig:
        return stream.replace(**dict(self.overrides))


def _fields() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(StreamConfig)}


def _value(field: str, raw: Any, where: str) -> Any:
    """Coerce `raw` (text from the command line, or a JSON value) to the type of StreamConfig.field."""
    fields = _fields()
    if field not in fields:
        raise StudyInputError(f"{where}: unknown setting {field!r}; StreamConfig fields are {', '.join(fields)}")
    default = fields[field]
    text = raw.strip().lower() if isinstance(raw, str) else None
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            if text in _BOOLS:
                return _BOOLS[text]
            raise ValueError("use on/off")
        if isinstance(default, tuple):
            items = raw.split("/") if isinstance(raw, str) else list(raw)
            return tuple(int(s) for s in items)
        if isinstance(default, int):
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError("not a whole number")
            return int(raw)
        return float(raw)
    except (TypeError, ValueError) as e:
        raise StudyInputError(f"{where}: {field}={raw!r} is not a valid {type(default).__name__} ({e})") from None


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value)


def _named(name: Optional[str], overrides: dict[str, Any]) -> Setting:
    auto = " ".join(f"{k}={_label(v)}" for k, v in overrides.items()) or "default"
    return Setting(name or auto, tuple(overrides.items()))


def _grid(body: str, where: str) -> list[dict[str, Any]]:
    axes = []
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        field, eq, values = part.partition("=")
        if not eq or not values.strip():
            raise StudyInputError(f"{where}: {part!r} should read FIELD=VALUE[,VALUE...]")
        field = field.strip()
        axes.append([(field, _value(field, v, where)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def parse_settings(spec: Union[str, Path, None], base: StreamConfig = StreamConfig()) -> tuple[Setting, ...]:
    """Settings variants from an inline spec or a JSON file (see the module docstring).

    Each variant is checked against `base` (a bad combination names the variant); names must
    give distinct slugs, since they become part of file names.
    """
    if spec is None or not str(spec).strip():
        return (Setting("default"),)
    path = Path(str(spec))
    if path.suffix.lower() == ".json":
        settings = _settings_file(path)
    else:
        settings = []
        for i, variant in enumerate(str(spec).split("|")):
            name, colon, body = variant.partition(":")
            if not colon:
                name, body = "", variant
            where = f"--settings variant {i + 1} ({variant.strip() or 'empty'})"
            combos = _grid(body, where)
            if name.strip() and len(combos) > 1:
                settings += [_named(f"{name.strip()} {_named(None, c).name}", c) for c in combos]
            else:
                settings += [_named(name.strip() or None, c) for c in combos]
    for s in settings:
        try:
            s.apply(base)
        except ValueError as e:
            raise StudyInputError(f"setting {s.name!r}: {e}") from None
    slugs = [s.slug for s in settings]
    dup = sorted({s for s in slugs if slugs.count(s) > 1})
    if dup:
        raise StudyInputError(f"--settings: variants named alike ({', '.join(dup)}); give each a distinct NAME:")
    return tuple(settings)


def _settings_file(path: Path) -> list[Setting]:
    if not path.is_file():
        raise StudyInputError(f"--settings {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StudyInputError(f"--settings {path}: not valid JSON: {e}") from None
    items = list(data.items()) if isinstance(data, dict) else [(None, d) for d in data] if isinstance(data, list) else None
    if not items:
        raise StudyInputError(f"--settings {path}: expected a non-empty {{NAME: {{field: value}}}} object or list")
    out = []
    for i, (name, overrides) in enumerate(items):
        where = f"--settings {path}: {name or f'item {i}'}"
        if not isinstance(overrides, dict):
            raise StudyInputError(f"{where}: expected an object of StreamConfig fields, got {overrides!r}")
        out.append(_named(name, {k: _value(k, v, where) for k, v in overrides.items()}))
    return out


def parse_seeds(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    """`"0,1,7"` or `"0-3"` (inclusive) or a mix -> seeds; None -> each story's own seed (else 0)."""
    if spec is None or not str(spec).strip():
        return None
    seeds = []
    for part in (p.strip() for p in str(spec).split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise StudyInputError(f"--seeds: {part!r} should be a seed (0 or more) or a range A-B with A <= B")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        seeds += range(lo, hi + 1)
    if any(s >= 2 ** 63 for s in seeds):
        raise StudyInputError("--seeds: seeds must be below 2**63")
    return tuple(dict.fromkeys(seeds))


# ----------------------------------------------------------------------------------------------
# Stories
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Story:
    """One video's prompts. `error` is set (and `timeline` None) when its input could not be read."""

    id: str
    source: str
    line: Optional[int]  # 1-based line in a .jsonl file
    timeline: Any  # memflow_nb.Timeline, or None
    error: Optional[str] = None


def read_stories(path: Union[str, Path], switch_frames: Sequence[int], num_latent_frames: int) -> list[Story]:
    """Stories from an official .jsonl (one per line), a Scope timeline .json, or a folder of them.

    A bad line or file becomes a Story with its `error`; the others still run. A problem that
    spoils every line (switch indices that are never reached) raises StudyInputError.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".json"))
        if not files:
            raise StudyInputError(f"{path}: no .jsonl or .json files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise StudyInputError(f"{path}: no such file or folder")
    stories = []
    for f in files:
        stories += _jsonl(f, switch_frames, num_latent_frames) if f.suffix.lower() == ".jsonl" else [_scope(f)]
    ids = [s.id for s in stories]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise StudyInputError(f"{path}: files give the same story ids ({', '.join(dup)}); rename one of them")
    return stories


def _stem(path: Path) -> str:
    name = path.name[: -len(path.suffix)]
    return _SAFE.sub("-", name.removesuffix(".scope")).strip("-") or "story"


def _describe(err) -> str:
    from .timeline.model import TimelineError

    if isinstance(err, TimelineError):
        return "; ".join(f"{re.sub(r'^lines[.]0[.]?', '', loc) or 'line'}: {msg}" for loc, msg in err.errors)
    return str(err)


def _jsonl(path: Path, switch_frames: Sequence[int], num_latent_frames: int) -> list[Story]:
    from .timeline.model import TimelineError
    from .timeline.official import from_official_jsonl

    try:  # checks the switch indices and length once, for the whole file
        from_official_jsonl([], switch_frames, num_latent_frames=num_latent_frames)
    except TimelineError as e:
        raise StudyInputError(f"{path}: {_describe(e)} (see --switch-frames and --frames)") from None
    lines = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    width = max(3, len(str(len(lines) - 1)))
    out = []
    for k, (n, line) in enumerate(lines):
        sid = f"{_stem(path)}-{k:0{width}d}"
        try:
            (timeline,) = from_official_jsonl([line], switch_frames, num_latent_frames=num_latent_frames)
            out.append(Story(sid, str(path), n, timeline))
        except TimelineError as e:
            out.append(Story(sid, str(path), n, None, f"{path} line {n}: {_describe(e)}"))
    return out


def _scope(path: Path) -> Story:
    from .timeline.model import Timeline, TimelineError

    try:
        return Story(_stem(path), str(path), None, Timeline.from_scope_json(path))
    except (TimelineError, OSError, UnicodeDecodeError) as e:
        return Story(_stem(path), str(path), None, None, f"{path}: {_describe(e)}")


# ----------------------------------------------------------------------------------------------
# Runs and shards
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One video of the study: a story under one setting with one seed, `num_chunks` long."""

    story: Story
    setting: Setting
    seed: int
    num_chunks: int

    @property
    def id(self) -> str:
        return f"{self.story.id}__{self.setting.slug}__seed{self.seed}"


def plan_runs(stories: Sequence[Story], settings: Sequence[Setting], seeds: Optional[Sequence[int]],
              num_chunks: Optional[int]) -> list[Run]:
    """Every (story, setting, seed). `num_chunks` None: each story's own length. Seeds None: the
    story's own seed, else 0 (as `generate` does)."""
    runs = []
    for story in stories:
        tl = story.timeline
        own = [tl.seed if tl is not None and tl.seed is not None else 0]
        n = 0 if tl is None else (num_chunks or tl.num_chunks)
        runs += [Run(story, s, seed, n) for s in settings for seed in (seeds or own)]
    return runs


def shard(runs: Sequence[Run], world_size: int) -> list[list[Run]]:
    """Split runs over ranks: longest first, each to the least-loaded rank (ties: lowest rank).

    Deterministic (cost then run id), so every rank computes the same split; each rank's list
    is in the order it should run it (longest first).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    shards: list[list[Run]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for run in sorted(runs, key=lambda r: (-r.num_chunks, r.id)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(run)
        load[rank] += max(1, run.num_chunks)
    return shards

"""Tests for memflow_nb.timeline: model validation, file formats, chunk mapping, blending math."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from memflow_nb.timeline.clock import (chunk_of_time, chunk_video_frames, chunks_for_frames, frames_in_chunk,
                                       frames_of_chunks, time_of_chunk)
from memflow_nb.timeline.conditioning import (Blend, Transition, blend_prompts, chunk_embeddings, conditioning_plan,
                                              slerp, transition_schedule, unique_texts)
from memflow_nb.timeline.model import Segment, Timeline, TimelineError, WeightedPrompt
from memflow_nb.timeline.official import from_official_jsonl, official_switch_chunks, to_official_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
DEFAULT_SWITCHES = [40, 80, 120, 160, 200]  # MemFlow's interactive_inference.yaml
HELD_BLOCK_KEYS = ("startTime", "endTime", "prompts", "transitionSteps", "temporalInterpolationMethod")


def seg(start, end, *prompts, **kw):
    return {"start": start, "end": end, "prompts": list(prompts) or ["a lighthouse on a cliff"], **kw}


def make(*segments, **kw) -> Timeline:
    return Timeline(segments=list(segments), **kw)


def error_paths(fn) -> list[str]:
    with pytest.raises(TimelineError) as info:
        fn()
    err = info.value
    assert isinstance(err, ValueError)
    for path, _ in err.errors:  # every listed path is in the message
        assert path in str(err)
    return [p for p, _ in err.errors]


def first_frame_brute(f: int, chunk_frames: int = 3) -> int:
    """Reference: first chunk whose first video frame is >= f, by scanning chunks."""
    k = 0
    while chunk_video_frames(k, chunk_frames)[0] < f:
        k += 1
    return k


# ------------------------------------------------------------------------------------------------
# Chunk mapping
# ------------------------------------------------------------------------------------------------

def test_chunk_video_frames_follow_the_vae_rule():
    assert chunk_video_frames(0) == (0, 9)
    assert chunk_video_frames(1) == (9, 21)
    assert chunk_video_frames(2) == (21, 33)
    # Consecutive chunks tile the video without gaps; 80 chunks give the official 957 frames.
    for k in range(1, 80):
        assert chunk_video_frames(k)[0] == chunk_video_frames(k - 1)[1]
    assert chunk_video_frames(79)[1] == 957


@pytest.mark.parametrize("frame, chunk", [(0, 0), (1, 1), (8, 1), (9, 1), (10, 2), (21, 2), (22, 3), (33, 3)])
def test_chunk_of_time_at_frame_boundaries(frame, chunk):
    assert chunk_of_time(frame / 16) == chunk
    assert first_frame_brute(frame) == chunk


def test_chunk_of_time_rounds_to_the_nearest_frame():
    assert chunk_of_time(9.4 / 16) == 1  # frame 9
    assert chunk_of_time(9.5 / 16) == 2  # frame 10 (half rounds up)
    assert time_of_chunk(14) == 165 / 16


@given(st.integers(0, 5000), st.integers(1, 6))
def test_chunk_of_time_matches_brute_force(frame, chunk_frames):
    assert chunk_of_time(frame / 16, chunk_frames) == first_frame_brute(frame, chunk_frames)


@given(st.integers(-5, 5000), st.integers(1, 6))
def test_chunks_for_frames_is_the_fewest_chunks_that_make_them(frames, chunk_frames):
    n = chunks_for_frames(frames, chunk_frames)
    assert frames_of_chunks(n, chunk_frames) >= frames and n >= 0
    assert n == 0 or frames_of_chunks(n - 1, chunk_frames) < frames
    assert sum(frames_in_chunk(k, chunk_frames) for k in range(n)) == frames_of_chunks(n, chunk_frames)
    assert [frames_in_chunk(k) for k in range(3)] == [9, 12, 12] and chunks_for_frames(45) == 4


def test_seconds_timeline_maps_segments_to_chunks():
    tl = make(seg(0, 9 / 16, "a"), seg(9 / 16, 10 / 16, "b"), seg(10 / 16, 10, "c"))
    switches = tl.effective_switches()
    assert [(s.segment, s.chunk) for s in switches] == [(0, 0), (1, 1), (2, 2)]
    assert switches[2].time == 21 / 16 and switches[2].requested_start == 10 / 16
    # 10 s = 160 frames: 14 chunks give 165 frames, 13 would give only 153.
    assert tl.num_chunks == 14
    assert chunk_video_frames(13)[1] >= 160 > chunk_video_frames(12)[1]
    assert tl.chunk_plan() == (0, 1) + (2,) * 12


def test_short_segment_that_rounds_to_zero_chunks_never_plays():
    tl = make(seg(0, 1, "a"), seg(1, 1.2, "b"), seg(1.2, 3, "c"))
    switches = tl.effective_switches()
    assert switches[1].chunk == switches[2].chunk
    assert 1 not in tl.chunk_plan()


def test_gaps_extend_the_previous_segment_and_first_segment_owns_chunk_zero():
    tl = make(seg(2, 3, "a"), seg(6, 8, "b"))
    plan = tl.chunk_plan()
    assert plan[0] == 0 and tl.effective_switches()[0].chunk == 0
    b_start = chunk_of_time(6)
    assert set(plan[:b_start]) == {0} and set(plan[b_start:]) == {1}


def test_chunk_unit_plan_is_exact():
    tl = make(seg(0, 5, "a"), seg(5, 7, "b"), seg(9, 12, "c"), unit="chunks")
    assert tl.chunk_plan() == (0,) * 5 + (1,) * 4 + (2,) * 3
    assert tl.num_chunks == 12
    assert [s.chunk for s in tl.effective_switches()] == [0, 5, 9]


# ------------------------------------------------------------------------------------------------
# Official switch rule
# ------------------------------------------------------------------------------------------------

def test_official_switch_chunks_memflow_defaults():
    chunks = official_switch_chunks(DEFAULT_SWITCHES, num_chunks=80)
    assert [c * 3 for c in chunks] == [42, 81, 120, 162, 201]


def test_official_switch_chunks_advances_once_per_chunk():
    # All three indices are passed by chunk 2 (frame 6), but only one segment advances per chunk.
    assert official_switch_chunks([3, 4, 5], num_chunks=10) == [1, 2, 3]
    assert official_switch_chunks([1, 1, 1], num_chunks=10) == [1, 2, 3]
    assert official_switch_chunks([40, 500], num_chunks=80) == [14]  # 500 never reached
    assert official_switch_chunks([7], num_chunks=10, chunk_frames=4) == [2]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

BAD_TIMELINES = {
    "start not a number": (dict(segments=[seg("zero", 1)]), "segments.0.start"),
    "weight as a string": (dict(segments=[seg(0, 1, {"text": "a", "weight": "1"})]), "segments.0.prompts.0.weight"),
    "text not a string": (dict(segments=[seg(0, 1, {"text": 5})]), "segments.0.prompts.0.text"),
    "seed not an int": (dict(segments=[seg(0, 1)], seed=1.5), "seed"),
    "steps bool": (dict(segments=[seg(0, 1, transition_steps=True)]), "segments.0.transition_steps"),
    "negative start": (dict(segments=[seg(-1, 1)]), "segments.0.start"),
    "end == start": (dict(segments=[seg(2, 2)]), "segments.0.end"),
    "end < start": (dict(segments=[seg(0, 1), seg(3, 2)]), "segments.1.end"),
    "overlap": (dict(segments=[seg(0, 2), seg(1.5, 3), seg(3, 4)]), "segments.1.start"),
    "empty text": (dict(segments=[seg(0, 1, "")]), "segments.0.prompts.0.text"),
    "whitespace text": (dict(segments=[seg(0, 1, "a", " \n\t")]), "segments.0.prompts.1.text"),
    "negative weight": (dict(segments=[seg(0, 1, "a", {"text": "b", "weight": -0.5})]), "segments.0.prompts.1.weight"),
    "nan weight": (dict(segments=[seg(0, 1, {"text": "a", "weight": math.nan})]), "segments.0.prompts.0.weight"),
    "inf weight": (dict(segments=[seg(0, 1, {"text": "a", "weight": math.inf})]), "segments.0.prompts.0.weight"),
    "all-zero weights": (dict(segments=[seg(0, 1, {"text": "a", "weight": 0}, {"text": "b", "weight": 0.0})]),
                         "segments.0.prompts"),
    "no prompts": (dict(segments=[seg(0, 1)] * 0 + [{"start": 0, "end": 1, "prompts": []}]), "segments.0.prompts"),
    "no segments": (dict(segments=[]), "segments"),
    "height not /16": (dict(segments=[seg(0, 1)], height=100, width=832), "height"),
    "width zero": (dict(segments=[seg(0, 1)], height=480, width=0), "width"),
    "negative height": (dict(segments=[seg(0, 1)], height=-16, width=832), "height"),
    "width missing": (dict(segments=[seg(0, 1)], height=480), "width"),
    "negative transition": (dict(segments=[seg(0, 1, transition_steps=-1)]), "segments.0.transition_steps"),
    "bad method": (dict(segments=[seg(0, 1, transition_method="cubic")]), "segments.0.transition_method"),
    "fractional chunk": (dict(segments=[seg(0, 2.5)], unit="chunks"), "segments.0.end"),
    "unknown unit": (dict(segments=[seg(0, 1)], unit="frames"), "unit"),
    "steps ascending": (dict(segments=[seg(0, 1)], denoising_steps=[250, 500]), "denoising_steps"),
    "step out of range": (dict(segments=[seg(0, 1)], denoising_steps=[1000, 0]), "denoising_steps.1"),
    "unknown field": (dict(segments=[seg(0, 1, colour="red")]), "segments.0.colour"),
}


@pytest.mark.parametrize("case", sorted(BAD_TIMELINES))
def test_timeline_validation_names_the_field(case):
    fields, path = BAD_TIMELINES[case]
    assert path in error_paths(lambda: Timeline(**fields))
    assert path in error_paths(lambda: Timeline.model_validate(fields))


def test_all_failing_fields_are_listed_and_pydantic_error_is_kept():
    fields = dict(segments=[seg(0, 1, {"text": "", "weight": -1}), seg(2, 1)], height=100, width=96, seed=-3)
    with pytest.raises(TimelineError) as info:
        Timeline(**fields)
    paths = {p for p, _ in info.value.errors}
    assert {"segments.0.prompts.0.text", "segments.0.prompts.0.weight", "segments.1.end", "height", "seed"} <= paths
    assert isinstance(info.value.validation_error, ValidationError)
    assert info.value.__cause__ is info.value.validation_error


def test_every_overlap_is_listed():
    paths = error_paths(lambda: make(seg(0, 5), seg(1, 6), seg(2, 7)))
    assert paths == ["segments.1.start", "segments.2.start"]


def test_nested_models_and_json_validation_raise_timeline_error_too():
    doc = '{"segments": [{"start": 0, "end": 1, "prompts": [{"text": "a", "weight": -2}]}], "seed": -1}'
    assert set(error_paths(lambda: Timeline.model_validate_json(doc))) == {"segments.0.prompts.0.weight", "seed"}
    assert "weight" in error_paths(lambda: WeightedPrompt(text="a", weight=-1))
    assert "end" in error_paths(lambda: Segment(start=1, end=0, prompts=["a"]))


def test_timeline_is_frozen_and_replace_revalidates():
    tl = make(seg(0, 1))
    with pytest.raises(ValidationError):
        tl.seed = 3
    assert tl.replace(seed=3).seed == 3 and tl.seed is None
    assert "seed" in error_paths(lambda: tl.replace(seed=-1))


def scope_doc(**over) -> dict:
    doc = {"version": "2.0", "prompts": [
        {"startTime": 0, "endTime": 4, "prompts": [{"text": "a lighthouse at dusk", "weight": 100}]},
        {"startTime": 4, "endTime": 8, "prompts": [{"text": "a stormy sea", "weight": 50},
                                                    {"text": "a red fishing boat", "weight": 50}]},
        {"startTime": 8, "endTime": 12, "prompts": [{"text": "a calm harbour at dawn", "weight": 1}],
         "transitionSteps": 3, "temporalInterpolationMethod": "linear"}],
        "settings": {"resolution": {"height": 480, "width": 832}, "seed": 7, "denoisingSteps": [1000, 750, 500, 250]}}
    doc.update(over)
    return doc


def mutate(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


BAD_SCOPE = {
    "unknown version": (("version",), "3.0", "version"),
    "version as number": (("version",), 2.0, "version"),
    "weight negative": (("prompts", 1, "prompts", 0, "weight"), -1, "prompts.1.prompts.0.weight"),
    "weight string": (("prompts", 2, "prompts", 0, "weight"), "heavy", "prompts.2.prompts.0.weight"),
    "blank text": (("prompts", 2, "prompts", 0, "text"), "   ", "prompts.2.prompts.0.text"),
    "zero weights": (("prompts", 1, "prompts"), [{"text": "a", "weight": 0}, {"text": "b", "weight": 0}],
                     "prompts.1.prompts"),
    "start negative": (("prompts", 0, "startTime"), -2, "prompts.0.startTime"),
    "end before start": (("prompts", 1, "endTime"), 3, "prompts.1.endTime"),
    "overlap": (("prompts", 2, "startTime"), 7.5, "prompts.2.startTime"),
    "steps negative": (("prompts", 2, "transitionSteps"), -4, "prompts.2.transitionSteps"),
    "method unknown": (("prompts", 2, "temporalInterpolationMethod"), "cubic", "prompts.2.temporalInterpolationMethod"),
    "height not /16": (("settings", "resolution", "height"), 500, "settings.resolution.height"),
    "width missing": (("settings", "resolution"), {"height": 480}, "settings.resolution.width"),
    "seed float": (("settings", "seed"), 0.5, "settings.seed"),
    "steps not a list": (("settings", "denoisingSteps"), "fast", "settings.denoisingSteps"),
    "block not an object": (("prompts", 1), "a stormy sea", "prompts.1"),
    "start missing": (("prompts", 0), {"endTime": 4, "prompts": [{"text": "a", "weight": 1}]}, "prompts.0.startTime"),
    "no prompts nor text": (("prompts", 0), {"startTime": 0, "endTime": 4}, "prompts.0.prompts"),
    "text fallback blank": (("prompts", 0), {"startTime": 0, "endTime": 4, "text": " "}, "prompts.0.text"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCOPE))
def test_scope_validation_names_the_scope_field(case):
    path, value, expected = BAD_SCOPE[case]
    doc = mutate(scope_doc(), path, value)
    assert expected in error_paths(lambda: Timeline.from_scope_json(doc))


def test_scope_file_level_errors():
    assert "version" in error_paths(lambda: Timeline.from_scope_json({"prompts": []}))
    assert "" in error_paths(lambda: Timeline.from_scope_json("{not json"))
    assert "" in error_paths(lambda: Timeline.from_scope_json([1, 2]))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Scope JSON round trips
# ------------------------------------------------------------------------------------------------

def test_timeline_to_scope_and_back_is_identical(tmp_path):
    tl = make(seg(0, 3.25, {"text": "a keeper climbs the lighthouse stairs", "weight": 100}),
              seg(3.25, 7, {"text": "storm waves", "weight": 2.5}, {"text": "a red boat", "weight": 0},
                  transition_steps=4, transition_method="slerp"),
              seg(8, 9.5, "dawn over the harbour", transition_steps=0),
              seed=123, height=480, width=832, denoising_steps=[1000, 750, 500, 250])
    doc = tl.to_scope_json(exported_at="2026-01-01T00:00:00Z")
    assert doc["version"] == "2.1" and doc["exportedAt"] == "2026-01-01T00:00:00Z"
    assert Timeline.from_scope_json(doc) == tl
    assert Timeline.from_scope_json(json.dumps(doc)) == tl
    path = tmp_path / "t.json"
    tl.to_scope_json(path)
    assert Timeline.from_scope_json(path) == tl
    assert Timeline.from_scope_json(str(path)) == tl


def test_scope_file_to_timeline_and_back_keeps_every_held_key():
    raw = json.loads((DATA / "timeline_lighthouse.scope.json").read_text())
    tl = Timeline.from_scope_json(DATA / "timeline_lighthouse.scope.json")
    out = tl.to_scope_json()
    assert out["prompts"] == [{k: b[k] for k in HELD_BLOCK_KEYS if k in b} for b in raw["prompts"]]
    for key in ("resolution", "seed", "denoisingSteps"):
        assert out["settings"][key] == raw["settings"][key]
    assert tl.segments[2].prompts[1].weight == 30 and tl.segments[2].transition_method == "linear"


def test_scope_v1_drops_ui_keys_and_falls_back_to_text():
    tl = Timeline.from_scope_json(DATA / "timeline_night_market.v1.scope.json")
    assert tl.segments[0].prompts[0].text.startswith("A young street cook")
    assert tl.segments[0].prompts[0].weight == 1.0
    # A block with prompts ignores its text field.
    assert tl.segments[1].prompts[0].text.startswith("The young street cook")
    assert tl.seed is None and tl.height is None
    block = tl.to_scope_json()["prompts"][1]
    assert not {"id", "text", "isLive", "color"} & set(block)


def test_scope_seed_from_schema_field_overrides():
    doc = scope_doc(settings={"schemaFieldOverrides": {"base_seed": 99, "vae_type": "tae"}})
    assert Timeline.from_scope_json(doc).seed == 99


def test_chunk_timeline_exports_seconds_with_the_same_plan():
    tl = make(seg(0, 5, "a"), seg(5, 9, "b"), seg(11, 20, "c"), unit="chunks")
    back = Timeline.from_scope_json(tl.to_scope_json())
    assert back.unit == "seconds"
    assert back.chunk_plan() == tl.chunk_plan()


# ------------------------------------------------------------------------------------------------
# Official JSONL
# ------------------------------------------------------------------------------------------------

def test_official_jsonl_round_trip_from_file(tmp_path):
    src = DATA / "memflow_prompts.jsonl"
    timelines = from_official_jsonl(src, DEFAULT_SWITCHES, num_latent_frames=240)
    assert len(timelines) == 2
    for tl in timelines:
        assert tl.unit == "chunks" and tl.num_chunks == 80
        assert [s.chunk * 3 for s in tl.effective_switches()[1:]] == [42, 81, 120, 162, 201]
    out = to_official_jsonl(timelines, tmp_path / "out.jsonl")
    raw_lines = [json.loads(ln) for ln in src.read_text().splitlines() if ln.strip()]
    assert [json.loads(ln) for ln in out.lines] == raw_lines
    assert out.num_latent_frames == 240
    # Written indices are the effective ones; they reproduce the same switch chunks.
    assert official_switch_chunks(out.switch_frame_indices, 80) == official_switch_chunks(DEFAULT_SWITCHES, 80)
    again = from_official_jsonl(tmp_path / "out.jsonl", out.switch_frame_indices, num_chunks=80)
    assert again == timelines


def test_timelines_to_official_jsonl_and_back_are_identical():
    tls = [make(seg(0, 4, "a red fox in snow"), seg(4, 9, "the fox leaps"), seg(9, 10, "the fox sleeps"),
                unit="chunks", seed=5),
           make(seg(0, 4, "a clockmaker"), seg(4, 9, "the watch"), seg(9, 10, "the shop"), unit="chunks", seed=5)]
    out = to_official_jsonl(tls)
    back = from_official_jsonl(out.lines, out.switch_frame_indices, num_latent_frames=out.num_latent_frames, seed=5)
    assert back == tls
    text = "\n".join(out.lines)
    assert from_official_jsonl(text, out.switch_frame_indices, num_chunks=10, seed=5) == tls


@pytest.mark.parametrize("kwargs, lines, expected", [
    (dict(num_latent_frames=240), ['{"prompts": ["a", "b"]}'], "lines.0.prompts"),
    (dict(num_latent_frames=240), ['{"prompts": ["a","b","c","d","e","f"]}', '{"prompts": ["a","b"," ","d","e","f"]}'],
     "lines.1.prompts.2"),
    (dict(num_latent_frames=240), ['{"prompts": ["a","b","c","d","e","f"]}', '{"prompts": '], "lines.1"),
    (dict(num_latent_frames=240), ['["a","b","c","d","e","f"]'], "lines.0"),
    (dict(num_latent_frames=241), ['{"prompts": ["a","b","c","d","e","f"]}'], "num_latent_frames"),
    (dict(num_chunks=0), ['{"prompts": ["a","b","c","d","e","f"]}'], "num_chunks"),
    (dict(num_chunks=60), ['{"prompts": ["a","b","c","d","e","f"]}'], "switch_frame_indices.4"),
    (dict(), ['{"prompts": ["a","b","c","d","e","f"]}'], "num_chunks"),
])
def test_official_jsonl_errors(kwargs, lines, expected):
    assert expected in error_paths(lambda: from_official_jsonl(lines, DEFAULT_SWITCHES, **kwargs))


def test_official_switch_index_zero_is_rejected():
    assert "switch_frame_indices.0" in error_paths(
        lambda: from_official_jsonl(['{"prompts": ["a", "b"]}'], [0], num_chunks=5))


def test_to_official_jsonl_refuses_what_the_format_cannot_hold():
    blend = make(seg(0, 2, "a", "b"), seg(2, 4, "c", transition_steps=2), unit="chunks")
    paths = error_paths(lambda: to_official_jsonl([blend]))
    assert "timelines.0.segments.0.prompts" in paths and "timelines.0.segments.1.transition_steps" in paths
    a, b = make(seg(0, 2, "a"), seg(2, 4, "b"), unit="chunks"), make(seg(0, 3, "a"), seg(3, 4, "b"), unit="chunks")
    assert "timelines.1" in error_paths(lambda: to_official_jsonl([a, b]))
    assert "timelines" in error_paths(lambda: to_official_jsonl([]))
    assert "timelines.0.segments.1.start" in error_paths(  # rounds to zero chunks
        lambda: to_official_jsonl([make(seg(0, 1, "a"), seg(1, 1.2, "b"), seg(1.2, 3, "c"))]))
    assert "seed" in error_paths(lambda: from_official_jsonl(['{"prompts": ["a"]}'], [], num_chunks=2, seed=-1))


# ------------------------------------------------------------------------------------------------
# Blending math
# ------------------------------------------------------------------------------------------------

def rand_embeds(n=3, L=7, D=16, seed=0, dtype=torch.float64):
    return torch.randn(n, L, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("method, n", [("linear", 3), ("linear", 2), ("slerp", 2)])
def test_scaling_all_weights_changes_nothing(method, n):
    e = rand_embeds(n)
    w = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    torch.testing.assert_close(blend_prompts(e, w, method), blend_prompts(e, 37.5 * w, method))
    torch.testing.assert_close(blend_prompts(e, w.tolist(), method), blend_prompts(e, w, method))


def test_linear_blend_norm_is_weighted_mean_norm_per_token():
    e = rand_embeds(4)
    e[2] *= 5.0  # differing norms so the mean is not trivial
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = blend_prompts(e, w, "linear")
    assert out.shape == (7, 16)
    expected = ((w / w.sum())[:, None] * e.norm(dim=-1)).sum(0)
    torch.testing.assert_close(out.norm(dim=-1), expected)
    # Direction is that of the plain weighted sum.
    plain = torch.einsum("n,nld->ld", w / w.sum(), e)
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(out, plain, dim=-1),
                               torch.ones(7, dtype=torch.float64))


def test_blend_special_cases():
    e = rand_embeds(3)
    assert torch.equal(blend_prompts(e[:1], [5.0]), e[0])
    torch.testing.assert_close(blend_prompts(e[:2], [1, 3], "slerp"), slerp(e[0], e[1], 0.75))
    torch.testing.assert_close(blend_prompts(e, [1, 1, 2], "slerp"), blend_prompts(e, [1, 1, 2], "linear"))
    half = blend_prompts(e.to(torch.bfloat16), [1, 1, 1])
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    zero_token = e.clone()
    zero_token[:, 3] = 0  # T5 padding tokens are zero vectors
    assert torch.isfinite(blend_prompts(zero_token, [1, 2, 3])).all()
    for bad in ([1, -1, 1], [0, 0, 0], [1, math.nan, 1], [1, 1]):
        with pytest.raises(ValueError):
            blend_prompts(e, bad)


def test_slerp_endpoints_are_the_inputs():
    a, b = rand_embeds(2, dtype=torch.float32)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    torch.testing.assert_close(slerp(a, b, 1e-9), a)


def test_slerp_midpoint_of_orthogonal_unit_vectors():
    a = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    m = slerp(a, b, 0.5)
    torch.testing.assert_close(m.norm(dim=-1), torch.ones(1, dtype=torch.float64))
    cos_a, cos_b = (m * a).sum(-1), (m * b).sum(-1)
    torch.testing.assert_close(cos_a, cos_b)
    torch.testing.assert_close(torch.acos(cos_a), torch.full((1,), math.pi / 4, dtype=torch.float64))
    # Unlike lerp, which would cut the corner to norm sqrt(0.5).
    assert torch.lerp(a, b, 0.5).norm() < 0.8


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    a = rand_embeds(1)[0]
    b = 2.0 * a
    torch.testing.assert_close(slerp(a, b, 0.3), torch.lerp(a, b, 0.3))
    # Opposite and zero vectors stay finite (slerp is undefined there).
    assert torch.isfinite(slerp(a, -a, 0.5)).all()
    assert torch.isfinite(slerp(a, torch.zeros_like(a), 0.5)).all()


def test_transition_schedule_first_and_last():
    src, dst = rand_embeds(2, dtype=torch.float32)
    for method in ("linear", "slerp"):
        s = transition_schedule(src, dst, 5, method)
        assert s.shape == (5, 7, 16)
        assert torch.equal(s[0], src) and torch.equal(s[-1], dst)
    torch.testing.assert_close(transition_schedule(src, dst, 3, "linear")[1], (src + dst) / 2)
    assert torch.equal(transition_schedule(src, dst, 1)[0], src)
    with pytest.raises(ValueError):
        transition_schedule(src, dst, 0)
    with pytest.raises(ValueError):
        transition_schedule(src, dst, 3, "cubic")


# ------------------------------------------------------------------------------------------------
# Conditioning plan and chunk embeddings
# ------------------------------------------------------------------------------------------------

class FakeEncoder:
    """Deterministic text -> [1, L, D] embedding that counts its calls."""

    def __init__(self, L=6, D=8):
        self.calls: Counter[str] = Counter()
        self.L, self.D = L, D

    def __call__(self, text: str) -> torch.Tensor:
        self.calls[text] += 1
        g = torch.Generator().manual_seed(sum(map(ord, text)) * 7919 % 2**31)
        return torch.randn(1, self.L, self.D, generator=g)


def test_each_distinct_text_is_encoded_once():
    tl = make(seg(0, 3, "fox"), seg(3, 6, "fox", "snow", transition_steps=2), seg(6, 9, "fox"),
              seg(9, 12, "snow", {"text": "fox", "weight": 3}), unit="chunks")
    enc = FakeEncoder()
    out = list(chunk_embeddings(tl, enc))
    assert set(enc.calls) == set(unique_texts(tl)) == {"fox", "snow"}
    assert all(n == 1 for n in enc.calls.values())
    assert [c for c, _, _ in out] == list(range(12))
    assert all(e.shape == (1, 6, 8) for _, e, _ in out)


def test_hard_switches_flag_changes_only_at_switch_chunks():
    tl = make(seg(0, 4, "a"), seg(4, 6, "b"), seg(6, 8, {"text": "b", "weight": 9}), seg(8, 10, "c"), unit="chunks")
    plan = conditioning_plan(tl)
    # Segment 2 repeats segment 1's blend (weights only differ in scale): no switch event.
    assert [c.chunk for c in plan if c.changed] == [0, 4, 8]
    assert all(c.t is None for c in plan)
    assert plan[5].texts == ("b",) and plan[5].weights == {"b": 1.0}
    enc = FakeEncoder()
    emb = {c: (e, ch) for c, e, ch in chunk_embeddings(tl, enc)}
    assert torch.equal(emb[7][0], enc("b")) and torch.equal(emb[9][0], enc("c"))


def test_transition_follows_the_schedule():
    tl = make(seg(0, 4, "a"), seg(4, 12, "b", "c", transition_steps=4, transition_method="slerp"), unit="chunks")
    plan = conditioning_plan(tl)
    assert [c.t for c in plan[4:9]] == [None, pytest.approx(1 / 3), pytest.approx(2 / 3), None, None]
    assert [c.changed for c in plan[3:10]] == [False, False, True, True, True, False, False]
    assert isinstance(plan[5].conditioning, Transition) and plan[5].texts == ("a", "b", "c")
    assert plan[5].weights == {"b": 0.5, "c": 0.5}
    enc = FakeEncoder()
    emb = [e[0] for _, e, _ in chunk_embeddings(tl, enc)]
    target = blend_prompts(torch.cat([enc("b"), enc("c")]), [1, 1])
    sched = transition_schedule(enc("a")[0], target, 4, "slerp")
    for j in range(4):
        torch.testing.assert_close(emb[4 + j], sched[j], rtol=0, atol=1e-6)
    assert torch.equal(emb[4], emb[3])  # the first step equals the source


def test_cut_short_transition_is_the_next_source():
    tl = make(seg(0, 2, "a"), seg(2, 4, "b", transition_steps=5), seg(4, 8, "c", transition_steps=3), unit="chunks")
    plan = conditioning_plan(tl)
    assert isinstance(plan[3].conditioning, Transition)  # segment 1 is cut at its step 1 of 5
    assert plan[4].conditioning == plan[3].conditioning and not plan[4].changed  # step 0 = source
    assert isinstance(plan[5].conditioning, Transition) and plan[5].conditioning.source == plan[3].conditioning
    emb = [e for _, e, _ in chunk_embeddings(tl, FakeEncoder())]
    assert torch.equal(emb[4], emb[3])  # no jump when a transition is cut
    assert plan[6].conditioning == Blend(("c",), (1.0,), "linear")


def test_transition_into_the_same_blend_is_skipped_and_first_segment_never_transitions():
    tl = make(seg(0, 2, "a", transition_steps=3), seg(2, 4, "a", transition_steps=3), unit="chunks")
    plan = conditioning_plan(tl)
    assert [c.changed for c in plan] == [True, False, False, False]
    assert all(c.t is None for c in plan)


# ------------------------------------------------------------------------------------------------
# Property-based parser tests
# ------------------------------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
weights = st.one_of(st.just(1.0), st.integers(0, 100).map(float), st.floats(0, 1e6, allow_nan=False))


@st.composite
def timelines(draw) -> Timeline:
    segments, t = [], draw(st.floats(0, 5))
    for _ in range(draw(st.integers(1, 5))):
        ws = draw(st.lists(weights, min_size=1, max_size=3).filter(lambda w: sum(w) > 0))
        start = t + draw(st.one_of(st.just(0.0), st.floats(0, 3)))
        end = start + draw(st.floats(0.01, 20))
        segments.append(dict(start=start, end=end, prompts=[dict(text=draw(texts), weight=w) for w in ws],
                             transition_steps=draw(st.none() | st.integers(0, 8)),
                             transition_method=draw(st.sampled_from([None, "linear", "slerp"]))))
        t = end
    side = st.integers(1, 120).map(lambda n: 16 * n)
    res = draw(st.none() | st.tuples(side, side))
    steps = draw(st.none() | st.lists(st.integers(1, 1000), min_size=1, max_size=4, unique=True)
                 .map(lambda s: sorted(s, reverse=True)))
    return Timeline(segments=segments, seed=draw(st.none() | st.integers(0, 2**63 - 1)),
                    height=res and res[0], width=res and res[1], denoising_steps=steps)


@settings(max_examples=80, deadline=None)
@given(timelines())
def test_random_timelines_round_trip_through_scope_json(tl):
    doc = tl.to_scope_json(exported_at="x")
    assert Timeline.from_scope_json(doc) == tl
    assert Timeline.from_scope_json(json.dumps(doc)) == tl
    plan = conditioning_plan(tl)
    assert len(plan) == tl.num_chunks and plan[0].changed


SCOPE_KEYS = ["version", "prompts", "settings", "startTime", "endTime", "text", "weight", "transitionSteps",
              "temporalInterpolationMethod", "resolution", "height", "width", "seed", "denoisingSteps", "exportedAt"]
json_leaves = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=10)
               | st.sampled_from(["1.0", "2.0", "2.1", "slerp", "linear"]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(SCOPE_KEYS) | st.text(max_size=5), inner, max_size=5),
                           max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_garbage_raises_timeline_error(value):
    assume(not isinstance(value, str))  # a bare string is a file path (or JSON text, tested below)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "prompts"}  # without blocks it can never be valid
    with pytest.raises(TimelineError):
        Timeline.from_scope_json(value)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["1.0", "2.0", "2.1"]), json_values, json_values)
def test_garbage_under_a_valid_version_parses_or_raises_timeline_error(version, blocks, settings_):
    try:
        tl = Timeline.from_scope_json({"version": version, "prompts": blocks, "settings": settings_})
    except TimelineError as e:
        assert e.errors and isinstance(e.validation_error, (ValidationError, type(None)))
        return
    assert tl.num_chunks >= 1


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_garbage_json_text_raises_timeline_error(text):
    with pytest.raises(TimelineError):
        Timeline.from_scope_json("{" + text)
    with pytest.raises(TimelineError):
        from_official_jsonl(["{" + text], [3], num_chunks=4)


def leaf_paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        return [prefix]
    return [prefix] + [p for k, v in items for p in leaf_paths(v, prefix + (k,))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines(), st.data())
def test_corrupted_scope_files_parse_or_raise_timeline_error(tl, data):
    doc = tl.to_scope_json(exported_at="x")
    path = data.draw(st.sampled_from(leaf_paths(doc)[1:]))
    doc = mutate(doc, path, data.draw(json_values))
    try:
        parsed = Timeline.from_scope_json(doc)
    except TimelineError as e:
        assert e.errors and all(isinstance(p, str) for p, _ in e.errors)
        return
    assert parsed.num_chunks >= 1 and len(parsed.effective_switches()) == len(parsed.segments)

"""The timeline editor driven through its widgets (button.click(), widget values) on the tiny model.

Three 1-second segments at 32x48 make 5 chunks: segment 1 plays chunks 0-1, segment 2 chunk 2,
segment 3 chunks 3-4 (chunk k starts at video frame 12k - 3). Chunk 0 has 9 frames, later ones 12.
"""
import base64
import datetime
import json
import re
from pathlib import Path

import numpy as np
import pytest

import memflow_nb as mf

FOX = "a red fox with a white-tipped tail trotting through fresh snow in a pine forest at dawn, tracking shot"
NAP = "the same red fox with a white-tipped tail curled up asleep under a snowy pine tree, static camera"
OWL = "a snowy owl gliding low over the same pine forest at dusk, wide shot"
HERON = "a grey heron standing still in a frozen river at noon, close-up"
N_FRAMES = 9 + 12 * 4
ROOT = Path(__file__).parent.parent


@pytest.fixture
def editor(pipe):
    ed = mf.TimelineEditor(pipe, height=32, width=48, seed=3)
    ed.set_prompts(0, FOX)
    ed.segments[0].duration.value = 1.0
    ed.add_segment(NAP, duration=1.0)
    ed.add_segment(OWL, duration=1.0)
    return ed


def reference(pipe, tl):
    return mf.generate_video(pipe, tl, progress=False).frames


def click_and_wait(editor, button):
    button.click()
    assert editor.wait(timeout=120), "the background run did not finish"


def test_generate_button_streams_chunks_then_shows_the_video(pipe, editor):
    previews, progress = [], []
    editor.preview.observe(lambda c: previews.append(c["new"]), names="value")
    editor.progress.observe(lambda c: progress.append(c["new"]), names="value")
    assert editor.errors == [] and editor.video.value == ""
    click_and_wait(editor, editor.generate_button)
    assert editor.frames.shape == (N_FRAMES, 32, 48, 3) and editor.frames.dtype == np.uint8
    # One preview image per chunk, as each one arrived.
    assert len(previews) == 5 and all(bytes(p[:4]) == b"\x89PNG" for p in previews)
    assert progress[-5:] == [1, 2, 3, 4, 5] and editor.progress.max == 5
    assert "<video" in editor.video.value and "done: 5 chunks" in editor.status.value
    assert editor.log.outputs == () and editor.error_box.value == ""
    assert not editor.generate_button.disabled and editor.stop_button.disabled
    assert not editor.regenerate_button.disabled and editor.regenerate_chunk.max == 4
    # The button makes exactly what the library makes from the same timeline.
    assert np.array_equal(editor.frames, reference(pipe, editor.timeline))


def test_segments_are_added_removed_reordered_and_blended_through_widgets(editor):
    assert [s.prompts[0].text for s in editor.timeline.segments] == [FOX, NAP, OWL]
    editor.add_button.click()  # a new segment starts as a copy of the last one's prompts
    segs = editor.timeline.segments
    assert len(segs) == 4 and segs[3].prompts[0].text == OWL and (segs[3].start, segs[3].end) == (3.0, 8.0)
    editor.segments[3].prompts[0].text.value = HERON
    editor.segments[3].up.click()
    editor.segments[0].down.click()
    assert [s.prompts[0].text for s in editor.timeline.segments] == [NAP, FOX, HERON, OWL]
    assert editor.segments[0].up.disabled and editor.segments[-1].down.disabled
    editor.segments[2].remove.click()
    assert [s.prompts[0].text for s in editor.timeline.segments] == [NAP, FOX, OWL]
    # Blend a second prompt into segment 2, with a transition into it.
    seg = editor.segments[1]
    seg.add_prompt.click()
    seg.prompts[1].text.value, seg.prompts[1].weight.value = OWL, 0.25
    seg.transition_steps.value, seg.transition_method.value = 2, "linear"
    seg.duration.value = 2.5
    s1 = editor.timeline.segments[1]
    assert [(p.text, p.weight) for p in s1.prompts] == [(FOX, 1.0), (OWL, 0.25)]
    assert (s1.transition_steps, s1.transition_method) == (2, "linear")
    assert (s1.start, s1.end) == (1.0, 3.5) and editor.timeline.segments[2].start == 3.5
    seg.prompts[0].remove.click()
    assert [p.text for p in editor.timeline.segments[1].prompts] == [OWL]
    # Headers say which chunks each segment plays.
    assert "chunks 0&ndash;1" in editor.segments[0].header.value
    editor.seed.value, editor.height.value, editor.width.value = 11, 64, 96
    tl = editor.timeline
    assert (tl.seed, tl.height, tl.width) == (11, 64, 96)


def test_invalid_input_shows_the_field_errors_and_no_traceback(editor):
    editor.segments[0].prompts[0].text.value = "   "
    editor.segments[1].duration.value = 0.0  # ends where it starts
    editor.height.value = 50
    shown = editor.error_box.value
    assert "segments.0.prompts.0.text" in shown and "segment 1, prompt 1, text" in shown
    assert "prompt text is empty" in shown
    assert "segments.1.end" in shown and "segment 2, duration" in shown and "must be greater than start" in shown
    assert "height" in shown and "not divisible by 16" in shown
    assert {p for p, _ in editor.errors} == {"segments.0.prompts.0.text", "segments.1.end", "height"}
    # The offending widgets are outlined, the others are not.
    assert editor.segments[0].prompts[0].text.layout.border and editor.segments[1].duration.layout.border
    assert editor.height.layout.border and not editor.width.layout.border
    with pytest.raises(mf.TimelineError):
        editor.timeline
    click_and_wait(editor, editor.generate_button)
    assert editor.frames is None and editor.video.value == ""
    assert "segments.1.end" in editor.error_box.value
    assert editor.log.outputs == () and "Traceback" not in editor.error_box.value + editor.status.value
    # Fixing the fields clears the errors and the outlines.
    editor.segments[0].prompts[0].text.value = FOX
    editor.segments[1].duration.value = 1.0
    editor.height.value = 32
    assert editor.errors == [] and editor.error_box.value == ""
    assert not editor.segments[1].duration.layout.border


def test_regenerate_without_a_video_is_a_shown_error(editor):
    click_and_wait(editor, editor.regenerate_button)  # disabled in the UI; the click still reaches us
    assert "generate a video first" in editor.error_box.value and editor.log.outputs == ()


def test_summary_names_segment_starts_and_conditioning_changes(editor):
    # 1-second segments: segment 1 starts at chunk 2 (frame 16 -> chunk 2 starts at frame 21).
    editor.segments[1].transition_steps.value = 3
    tl = editor.timeline
    assert tl.switch_summary() in editor.summary.value
    starts = [sw.chunk for sw in tl.effective_switches()[1:]]
    assert f"segments start at chunks {starts}" in editor.summary.value
    assert f"conditioning changes at chunks [{starts[0] + 1}" in editor.summary.value  # a transition starts at t = 0


def test_scope_json_round_trips_through_the_widgets(editor):
    path = ROOT / "data" / "timeline_lighthouse.scope.json"
    original = mf.Timeline.from_scope_json(path)
    editor.json_text.value = path.read_text()
    editor.import_button.click()
    assert editor.errors == []
    assert editor.timeline == original  # seed, size, steps, weights, transitions: all kept
    assert [s.duration.value for s in editor.segments] == [8.0, 8.0, 8.0, 8.0]
    assert [s.transition_method.value for s in editor.segments[1:]] == ["slerp", "linear", "slerp"]
    editor.json_text.value = ""
    editor.export_button.click()
    exported = json.loads(editor.json_text.value)
    assert exported["version"] == "2.1" and mf.Timeline.from_scope_json(exported) == original
    b64 = re.search(r"base64,([A-Za-z0-9+/=]+)", editor.download.value).group(1)
    assert json.loads(base64.b64decode(b64)) == exported
    assert "download=" in editor.download.value

    # The file-upload button takes the same path (ipywidgets 8 value format).
    small = mf.Timeline(segments=[{"start": 0, "end": 2, "prompts": [HERON]}], height=32, width=48, seed=5)
    raw = json.dumps(small.to_scope_json()).encode()
    editor.upload.value = ({"name": "t.json", "type": "application/json", "size": len(raw),
                            "content": memoryview(raw), "last_modified": datetime.datetime.now()},)
    assert editor.timeline == small and len(editor.segments) == 1


def test_bad_imports_name_scope_fields_and_leave_the_editor_alone(editor):
    before = editor.timeline
    bad = mf.Timeline(segments=[{"start": 0, "end": 2, "prompts": [HERON]}]).to_scope_json()
    bad["prompts"][0]["prompts"][0]["text"] = ""
    bad["prompts"][0]["endTime"] = -1
    editor.json_text.value = json.dumps(bad)
    editor.import_button.click()
    shown = editor.error_box.value
    assert "Import failed" in shown and "prompts.0.prompts.0.text" in shown and "prompts.0.endTime" in shown
    editor.json_text.value = "{not json"
    editor.import_button.click()
    assert "not valid JSON" in editor.error_box.value
    assert editor.timeline == before and editor.log.outputs == ()


def test_regenerate_from_here_keeps_the_past_and_changes_the_future(pipe, editor):
    click_and_wait(editor, editor.generate_button)
    before = editor.frames.copy()
    editor.segments[2].prompts[0].text.value = HERON  # segment 3 starts at chunk 3
    editor.regenerate_chunk.value = 3
    assert "chunk 3 starts at 2.06 s (segment 3)" in editor.regenerate_info.value
    click_and_wait(editor, editor.regenerate_button)
    after = editor.frames
    first = 9 + 12 * 2  # frames of chunks 0-2
    assert after.shape == before.shape
    assert np.array_equal(after[:first], before[:first])
    assert not np.array_equal(after[first:], before[first:])
    # Bit-exact with generating the edited timeline from scratch.
    assert np.array_equal(after, reference(pipe, editor.timeline))
    assert "<video" in editor.video.value and editor.log.outputs == ()
    # The same through the Python API, from a chunk inside a segment, with a new seed.
    editor.seed.value = 4
    again = editor.regenerate_from(4)
    assert np.array_equal(again[:first + 12], after[:first + 12]) and not np.array_equal(again, after)


def test_regenerate_refuses_a_changed_size(editor):
    editor.generate()
    editor.width.value = 64
    assert editor.regenerate_from(2) is None
    assert "the size changed" in editor.error_box.value and editor.frames.shape[2] == 48


def test_stop_between_chunks_then_continue(pipe, editor):
    def stop_after_first(change):
        if change["new"] == 1:
            editor.stop_button.click()

    editor.progress.observe(stop_after_first, names="value")
    click_and_wait(editor, editor.generate_button)
    editor.progress.unobserve(stop_after_first, names="value")
    assert editor.frames.shape[0] == 9  # chunk 1 was never started
    assert "stopped after 1 of 5 chunks" in editor.status.value and "<video" in editor.video.value
    # "Regenerate from here" at the end of a stopped video continues it, as if never stopped.
    assert editor.regenerate_chunk.max == 1
    editor.regenerate_chunk.value = 1
    click_and_wait(editor, editor.regenerate_button)
    assert np.array_equal(editor.frames, reference(pipe, editor.timeline))


def test_a_second_generate_while_one_runs_is_refused(editor):
    seen = []

    def during(change):
        if change["new"] == 1:  # inside the background run, after its first chunk
            seen.extend([editor.generate(), editor.status.value])

    editor.progress.observe(during, names="value")
    click_and_wait(editor, editor.generate_button)
    assert seen[0] is None and "already generating" in seen[1]
    assert editor.frames.shape[0] == N_FRAMES and "done: 5 chunks" in editor.status.value


def test_max_chunks_makes_a_short_preview(editor):
    editor.max_chunks.value = 2
    frames = editor.generate()
    assert frames.shape == (9 + 12, 32, 48, 3) and "done: 2 chunks" in editor.status.value


def test_an_unexpected_error_is_one_line_plus_a_traceback_in_the_log(pipe, editor, monkeypatch):
    import memflow_nb.generation as widgets_mod  # the editor's session generates through it

    def broken(*a, **k):
        raise RuntimeError("the GPU caught fire")
        yield

    monkeypatch.setattr(widgets_mod, "generate", broken)
    click_and_wait(editor, editor.generate_button)
    assert "RuntimeError: the GPU caught fire" in editor.status.value
    assert "Traceback" in "".join(o.get("text", "") for o in editor.log.outputs)
    assert not editor.generate_button.disabled  # the editor is usable again


def test_segment_boxes_show_the_prompt_coach_and_update_after_edits(pipe):
    ed = mf.TimelineEditor(pipe, mf.Timeline.from_scope_json(ROOT / "data" / "timeline_bad_prompts.scope.json"),
                           height=32, width=48)
    badges = [s.coach.value for s in ed.segments]
    assert badges[0] == ""  # nothing to say about the first segment
    assert "1 warning<" in badges[1] and "pronoun_start" in badges[1] and "She" in badges[1]
    assert "description_drift" in badges[2] and "hard_cut" in badges[3]
    # Typing (a committed prompt edit) updates the badge of that segment.
    ed.segments[0].prompts[0].text.value = "He walks."
    assert "pronoun_start" in ed.segments[0].coach.value and "short_prompt" in ed.segments[0].coach.value
    # An invalid timeline leaves the last findings alone instead of coaching a broken one.
    ed.segments[0].duration.value = -1
    assert ed.errors and "pronoun_start" in ed.segments[0].coach.value
    ed.segments[0].duration.value = 6
    # "Copy the character from segment 1" fixes segment 3's drifted description, and its badge clears.
    ed.segments[0].prompts[0].text.value = mf.Timeline.from_scope_json(
        ROOT / "data" / "timeline_bad_prompts.scope.json").segments[0].prompts[0].text
    assert ed.segments[2].copy_from.options[0] == ("segment 1", 0)
    ed.segments[2].copy_from.value = 0
    ed.segments[2].copy_button.click()
    assert ed.segments[2].prompts[0].text.value.startswith("A young woman with short red hair in a yellow raincoat")
    assert "description_drift" not in ed.segments[2].coach.value

"""Tests for memflow_nb.prompt_coach (the prompt coach) and memflow_nb.prompt_text (its text analysis)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memflow_nb.prompt_coach import (KINDS, CoachSettings, Coaching, apply_suggestion, coach, copy_subject,
                                     prompt_similarity)
from memflow_nb.prompt_text import (approx_tokens, count_tokens, description_edits, mark_edits, subject_phrase,
                                    subject_edits, truncate_to_tokens, words)
from memflow_nb.text_encoder import encode_prompts
from memflow_nb.timeline.model import Timeline
from memflow_nb.timeline.official import from_official_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"

WOMAN = "A young woman with short red hair in a yellow raincoat"
STREET = ("rides an old green bicycle through a narrow rainy street of a European city at night, neon shop signs "
          "reflecting in the wet cobblestones, tracking shot from the side, cinematic, moody blue light")
BAKERY = ("stops under the striped awning of a small bakery on the same rainy street at night, looks up at the "
          "glowing neon sign, the green bicycle leaning against a lamp post, medium shot, cinematic, moody blue light")
SAVANNA = ("A herd of elephants crosses a dry savanna at noon under a blazing sun, dust rising around their feet, "
           "acacia trees and a distant mountain on the horizon, wide aerial shot, documentary style")


def timeline(*prompts, length: float = 6, **segment_fields) -> Timeline:
    """Consecutive segments of ``length`` seconds; a prompt may be a str or a full segment dict."""
    segs = []
    for i, p in enumerate(prompts):
        seg = p if isinstance(p, dict) else {"prompts": [p]}
        segs.append({"start": i * length, "end": (i + 1) * length, **segment_fields, **seg})
    return Timeline(segments=segs)


def kinds(result: Coaching, severity: str | None = None) -> list[tuple[int, str]]:
    return [(f.segment, f.kind) for f in result.findings if severity in (None, f.severity)]


@pytest.fixture(scope="module")
def tiny_pipe():
    import memflow_nb as mf

    return mf.load("tiny", device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# The example timelines: what the coach says where the advice is followed
# ------------------------------------------------------------------------------------------------

def test_lighthouse_example_has_only_its_real_drift():
    """The example file drops "weathered" from the keeper's description in segments 2 and 3: a real
    (small) departure from the advice, so the coach reports it there and nothing else."""
    result = coach(Timeline.from_scope_json(DATA / "timeline_lighthouse.scope.json"))
    assert kinds(result) == [(2, "description_drift"), (3, "description_drift")]
    for f in result.findings:
        assert "[-weathered]" in f.reason and f.other == 0 and f.prompt == 0
        assert f.replacement.startswith(("A weathered lighthouse keeper",
                                         "At calm blue dawn a weathered lighthouse keeper"))
    assert all(len(t) == 1 or len(t) == 2 for t in result.tokens)


def test_other_examples_follow_the_advice():
    night = Timeline.from_scope_json(DATA / "timeline_night_market.v1.scope.json")
    official = from_official_jsonl(DATA / "memflow_prompts.jsonl", [40, 80, 120, 160, 200], num_chunks=80)
    keeper = "a weathered lighthouse keeper with a short grey beard, in a navy wool coat and a knitted grey cap"
    place = "a tall white lighthouse on a rocky northern coast"
    story = timeline(  # notebook 02's story: the description set once and reused
        f"{keeper} walks along the stone path towards {place} in the blue evening light, the sea calm behind him, "
        "gulls overhead, slow tracking shot from behind, cinematic, natural colours",
        {"prompts": [f"{keeper} unlocks the heavy green door at the foot of {place} as dusk turns to night, the beam "
                     "above him starting to turn, wind in his coat, medium shot, cinematic, natural colours"],
         "transition_steps": 4},
        length=10)
    for tl in [night, story, *official]:
        assert coach(tl).findings == ()


# ------------------------------------------------------------------------------------------------
# The deliberately bad timeline (notebook 02)
# ------------------------------------------------------------------------------------------------

def test_bad_timeline_shows_pronoun_drift_and_hard_cut_and_the_fixes_clear_them():
    tl = Timeline.from_scope_json(DATA / "timeline_bad_prompts.scope.json")
    result = coach(tl)
    assert kinds(result) == [(1, "pronoun_start"), (2, "description_drift"), (3, "hard_cut")]
    pronoun, drift, cut = result.findings
    assert pronoun.replacement.startswith(WOMAN + " stops under")
    assert drift.reason.endswith("'A young woman with [short -> long] red hair in a [yellow -> green] raincoat'")
    assert drift.replacement.startswith(WOMAN + " steps into")
    assert cut.severity == "warn" and cut.changes == (("transition_steps", 4),)

    fixed = tl
    for f in result.findings:
        fixed = apply_suggestion(fixed, f)
    again = coach(fixed)
    assert again.warnings == ()
    assert kinds(again) == [(3, "hard_cut")] and again.findings[0].severity == "info"  # a transition now
    assert str(again).count("tokens): ok") == 3


# ------------------------------------------------------------------------------------------------
# Each finding on a timeline made to trigger it
# ------------------------------------------------------------------------------------------------

def test_too_long_prompt_is_reported_with_what_the_encoder_keeps():
    long = f"{WOMAN} {STREET}, " + ", ".join(["puddles glittering under the lamps"] * 80)
    result = coach(timeline(long))
    (f,) = result.findings
    assert (f.kind, f.severity, f.prompt) == ("too_long", "warn", 0)
    assert result.tokens[0][0] == approx_tokens(long) > 512
    assert long.startswith(f.replacement) and approx_tokens(f.replacement) <= 512 < approx_tokens(
        long[:words(long)[len(words(f.replacement))].end])
    assert "about" in f.reason and result.token_counter.startswith("approximate")


def test_short_prompt_is_reported_and_a_long_one_is_not():
    result = coach(timeline("A young woman on a bicycle at night.", f"{WOMAN} {STREET}"))
    assert kinds(result) == [(0, "short_prompt")]
    assert "8 words" in result.findings[0].reason and "extend_prompt" in result.findings[0].suggestion
    assert kinds(coach(timeline("A cat on a roof."), settings=CoachSettings(short_words=3))) == []


def test_pronoun_start_names_the_subject_of_the_previous_segment():
    tl = timeline(f"{WOMAN} {STREET}", f"She {BAKERY}", f"Her {BAKERY}")
    result = coach(tl)
    she, her = result.findings
    assert kinds(result) == [(1, "pronoun_start"), (2, "pronoun_start")]
    assert she.other == 0 and she.replacement == f"{WOMAN} {BAKERY}" and WOMAN in she.suggestion
    assert her.replacement is None and her.other == 0  # "Her bicycle" has no clean rewrite
    with pytest.raises(ValueError, match="no suggested edit"):
        apply_suggestion(tl, her)
    first = coach(timeline(f"He {STREET}")).findings[0]  # nobody to refer to at all
    assert first.kind == "pronoun_start" and first.other is None and first.replacement is None


def test_description_drift_shows_the_word_difference():
    result = coach(timeline(f"A man in a red coat {STREET}", f"The man in a blue coat {BAKERY}"))
    (f,) = result.findings
    assert (f.segment, f.kind, f.other) == (1, "description_drift", 0)
    assert "'The man in a [red -> blue] coat'" in f.reason
    assert f.replacement == f"A man in a red coat {BAKERY}"
    # Determiners do not count ("A man" = "The same man"), and a different subject is no drift.
    assert coach(timeline(f"A man in a red coat {STREET}", f"The same man in a red coat {BAKERY}")).findings == ()
    assert coach(timeline(f"A man in a red coat {STREET}", f"{SAVANNA}")).findings[0].kind == "hard_cut"


def test_drift_is_measured_against_the_first_description():
    result = coach(timeline(f"{WOMAN} {STREET}", f"A young woman with long red hair in a yellow raincoat {BAKERY}",
                            f"A young woman with long red hair in a yellow raincoat {BAKERY}, rain easing"))
    assert kinds(result) == [(1, "description_drift"), (2, "description_drift")]
    assert [f.other for f in result.findings] == [0, 0]


def test_hard_cut_warns_without_a_transition_and_notes_with_one():
    cut = coach(timeline(f"{WOMAN} {STREET}", SAVANNA)).findings
    assert [(f.segment, f.kind, f.severity) for f in cut] == [(1, "hard_cut", "warn")]
    assert "grow out of the old picture" in cut[0].reason and "bridging segment" in cut[0].suggestion
    blended = coach(timeline(f"{WOMAN} {STREET}", {"prompts": [SAVANNA], "transition_steps": 3}))
    assert [(f.segment, f.kind, f.severity) for f in blended.findings] == [(1, "hard_cut", "info")]
    # A related prompt is no cut.
    assert coach(timeline(f"{WOMAN} {STREET}", f"{WOMAN} {BAKERY}")).findings == ()


def test_segment_shorter_than_a_chunk_never_plays():
    text = f"{WOMAN} {STREET}"
    tl = Timeline(segments=[{"start": 0, "end": 6, "prompts": [text]}, {"start": 6, "end": 6.3, "prompts": [text]},
                            {"start": 6.3, "end": 12, "prompts": [text]}])
    assert 1 not in tl.chunk_plan()  # the timeline's own clock says so
    result = coach(tl)
    assert kinds(result) == [(1, "never_plays")]
    assert "chunk 9" in result.findings[0].reason and "0.75 s" in result.findings[0].suggestion


def test_transition_longer_than_its_segment():
    text = f"{WOMAN} {STREET}"
    tl = Timeline(segments=[{"start": 0, "end": 6, "prompts": [text]},
                            {"start": 6, "end": 7.5, "prompts": [f"{WOMAN} {BAKERY}"], "transition_steps": 4},
                            {"start": 7.5, "end": 12, "prompts": [text]}])
    plays = tl.chunk_plan().count(1)
    (f,) = coach(tl).findings
    assert (f.segment, f.kind, f.severity) == (1, "transition_too_long", "warn")
    assert f"plays {plays} chunks" in f.reason and f.changes == (("transition_steps", max(1, plays // 2)),)
    assert coach(apply_suggestion(tl, f)).findings == ()
    # Exactly as long as the segment reaches its prompt on its last chunk: fine.
    assert coach(tl.replace(segments=[tl.segments[0], tl.segments[1].replace(transition_steps=plays),
                                      tl.segments[2]])).findings == ()


def test_transition_on_the_first_segment_is_a_note():
    (f,) = coach(timeline({"prompts": [f"{WOMAN} {STREET}"], "transition_steps": 2})).findings
    assert (f.kind, f.severity, f.changes) == ("transition_ignored", "info", (("transition_steps", 0),))


def test_findings_are_grouped_by_segment_and_printed():
    result = coach(Timeline.from_scope_json(DATA / "timeline_bad_prompts.scope.json"))
    groups = result.by_segment()
    assert [len(g) for g in groups] == [0, 1, 1, 1] and groups[1] == result.for_segment(1)
    text = str(result)
    assert text.startswith("prompt coach: 4 segments, 3 warnings, 0 notes")
    assert "segment 0 (" in text and ": ok" in text and "pronoun_start" in text and "-> " in text
    assert set(f.kind for f in result.findings) <= set(KINDS)


def test_copy_subject_between_segments():
    tl = Timeline.from_scope_json(DATA / "timeline_bad_prompts.scope.json")
    copied = copy_subject(tl, 0, 2)
    assert copied.segments[2].prompts[0].text.startswith(WOMAN + " steps into")
    assert copied.segments[0] == tl.segments[0] and copied.segments[3] == tl.segments[3]
    assert copy_subject(tl, 0, 1).segments[1].prompts[0].text.startswith(WOMAN + " stops under")
    assert copy_subject(timeline(f"{WOMAN} {STREET}", f"Her {BAKERY}"), 0, 1) is None


def test_coach_wants_a_timeline():
    with pytest.raises(TypeError, match="Timeline"):
        coach({"segments": []})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.sampled_from(
    "she a the man woman red blue coat in with walks climbs along path sea lighthouse at night , . his".split()),
    min_size=1, max_size=40).map(" ".join).filter(str.strip), st.floats(0.1, 4), st.integers(0, 6)),
    min_size=1, max_size=5))
def test_no_timeline_makes_the_coach_fail_and_every_suggestion_applies(spec):
    segs, t = [], 0.0
    for text, length, steps in spec:
        segs.append({"start": t, "end": t + length, "prompts": [text], "transition_steps": steps})
        t += length
    tl = Timeline(segments=segs)
    result = coach(tl)
    assert len(result.tokens) == len(tl.segments)
    for f in result.findings:
        assert f.kind in KINDS and f.severity in ("info", "warn") and 0 <= f.segment < len(tl.segments)
        if f.replacement is not None or f.changes:
            fixed = apply_suggestion(tl, f)
            assert isinstance(fixed, Timeline)
        if f.changes:  # a suggested setting clears its warning and brings no timing warning
            after = [(g.kind, g.severity) for g in coach(fixed).for_segment(f.segment)]
            assert (f.kind, "warn") not in after and ("transition_too_long", "warn") not in after


# ------------------------------------------------------------------------------------------------
# With a pipeline: the real tokenizer and the text embeddings
# ------------------------------------------------------------------------------------------------

def test_with_a_pipe_tokens_are_counted_by_its_tokenizer(tiny_pipe):
    text = f"{WOMAN} {STREET}"
    result = coach(timeline(text), tiny_pipe)
    # The tiny tokenizer has one token per byte, plus </s>.
    assert result.tokens == ((len(text.encode()) + 1,),) and result.token_counter == "umT5 tokenizer"
    tok = tiny_pipe.text.tokenizer
    assert tok.count([text]) == [int(tok([text])[1].sum())]
    long = text + " and" * 200
    with pytest.warns(UserWarning, match="dropped"):
        assert tok([long])[1].sum() == tok.text_len
    (f,) = [f for f in coach(timeline(long), tiny_pipe).findings if f.kind == "too_long"]
    assert tok.count([f.replacement])[0] <= tok.text_len < tok.count([f.replacement + " and"])[0]
    assert "about" not in f.reason


def test_embedding_similarity_of_consecutive_segments(tiny_pipe):
    a, b = f"{WOMAN} {STREET}", SAVANNA
    tl = timeline(a, b, {"prompts": [{"text": b, "weight": 1.0}, {"text": a, "weight": 0.0}]}, a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no encoder warning leaks out
        sim = prompt_similarity(tiny_pipe, tl)
    assert sim[0] is None and sim[2] == pytest.approx(1.0, abs=1e-5)  # same embedding (weight 0 adds nothing)
    # An independent oracle: encode each prompt, keep its real rows by length, average, compare.
    ids, mask = tiny_pipe.text.tokenizer([a, b])
    emb = encode_prompts(tiny_pipe.text.encoder, tiny_pipe.text.tokenizer, [a, b])
    va, vb = (emb[i, :int(mask[i].sum())].mean(0) for i in range(2))
    assert sim[1] == pytest.approx(float(torch.cosine_similarity(va, vb, dim=0)), abs=1e-5)
    assert sim[3] == pytest.approx(sim[1], abs=1e-5)
    result = coach(tl, tiny_pipe)
    assert result.similarity == sim
    notes = [f for f in result.findings if f.kind == "embedding_similarity"]
    assert [f.segment for f in notes] == [1, 2, 3] and all(f.severity == "info" for f in notes)
    assert "random weights" in notes[0].reason


# ------------------------------------------------------------------------------------------------
# prompt_text
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, subject", [
    ("A weathered keeper in a navy wool coat climbs the spiral stairs", "A weathered keeper in a navy wool coat"),
    ("An old clockmaker with round spectacles sits at a cluttered bench", "An old clockmaker with round spectacles"),
    ("A man wearing a red coat and holding a lantern walks along the pier",
     "A man wearing a red coat and holding a lantern"),
    ("At calm blue dawn the keeper in a navy coat walks down the path", "the keeper in a navy coat"),
    ("She stops under the awning", None),
    ("Rain. A man walks in.", None),
])
def test_subject_phrase(text, subject):
    assert subject_phrase(text) == subject


def test_description_edits_and_marks():
    old = "A young woman with short red hair in a yellow raincoat"
    new = "The young woman with red hair in a green raincoat"
    edits = description_edits(old, new)
    assert [(e.old, e.new) for e in edits] == [("short", ""), ("yellow", "green")]
    assert mark_edits(new, edits) == "The young woman with [-short] red hair in a [yellow -> green] raincoat"
    assert description_edits(old, old) == [] and description_edits(old, "A herd of elephants on a dry plain") == []
    # A verb that ends a subject too late ("sleeves tosses noodles") is not a dropped word.
    assert subject_edits("A cook with a white bandana and denim sleeves tosses noodles in a wok",
                         "The cook with a white bandana and denim sleeves hands a bowl to a customer") == []


def test_truncate_to_tokens_keeps_the_longest_fitting_prefix():
    text = "one two three, four five six seven eight nine ten"
    for limit in range(1, approx_tokens(text) + 2):
        cut = truncate_to_tokens(text, limit)
        assert text.startswith(cut) and (cut == text or approx_tokens(cut) <= limit)
        n = len(words(cut))
        if cut != text and n:  # one more word would not fit
            assert approx_tokens(text[:words(text)[n].end]) > limit
    assert truncate_to_tokens("Supercalifragilistic", 1) == ""  # nothing fits: </s> alone is one token
    assert count_tokens(["a b"]) == [approx_tokens("a b")] == [4]


def test_public_names_stay_functions_after_the_modules_are_imported():
    """`mf.coach` is the function even when `memflow_nb.prompt_coach` was imported first (a module
    named `coach` would shadow it: importing a submodule sets the package attribute)."""
    import subprocess
    import sys

    code = ("import memflow_nb.prompt_coach, memflow_nb.prompt_extend, memflow_nb as mf\n"
            "assert callable(mf.coach) and callable(mf.apply_suggestion) and callable(mf.extend_prompt)\n"
            "assert mf.coach is memflow_nb.prompt_coach.coach\n"
            "import sys; assert 'transformers' not in sys.modules  # the extra loads only when used")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr

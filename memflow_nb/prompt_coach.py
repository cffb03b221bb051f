"""The prompt coach: MemFlow's prompting advice (README "Prompting", notebook 02), checked on a timeline.

``coach(timeline)`` returns findings per segment, each with a short reason and, where one can be
made, a suggested edit. The text checks need no model; with a pipeline (``coach(timeline, pipe)``)
token counts come from its umT5 tokenizer and consecutive prompts are also compared by the cosine
similarity of their text embeddings, which is what the DiT sees. No finding is an error: the
advice is a default, and the user decides.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

from . import prompt_text as pt
from .engine.config import ModelConfig
from .timeline.clock import CHUNK_FRAMES, time_of_chunk
from .timeline.model import Timeline

Severity = Literal["info", "warn"]

# Finding kinds: stable ids (the editor and tests key on them) and what each means.
KINDS = {
    "too_long": "the prompt has more tokens than the text encoder reads; the rest is dropped",
    "short_prompt": "the prompt is far shorter than the advice (long, concrete prompts)",
    "pronoun_start": "the prompt opens with a pronoun instead of naming the subject",
    "description_drift": "the subject is described differently from an earlier segment",
    "hard_cut": "the prompt shares almost nothing with the previous segment's",
    "never_plays": "the segment is shorter than a chunk and never plays",
    "transition_too_long": "the transition takes more chunks than the segment plays",
    "transition_ignored": "a transition on the first segment has nothing to blend from",
    "embedding_similarity": "cosine similarity of this and the previous segment's text embeddings",
}


@dataclass(frozen=True)
class Finding:
    """One piece of advice about one segment.

    ``prompt``: which prompt of the segment's blend it is about (None: the segment as a whole).
    ``replacement``: a suggested new text for that prompt; ``changes``: suggested new values of
    segment fields, as ``(field, value)`` pairs. ``apply_suggestion`` applies either.
    ``other``: the other segment the finding compares with, if any.
    """

    segment: int
    kind: str
    severity: Severity
    reason: str
    suggestion: Optional[str] = None
    prompt: Optional[int] = None
    replacement: Optional[str] = None
    changes: tuple[tuple[str, Any], ...] = ()
    other: Optional[int] = None

    def __str__(self) -> str:
        where = f"segment {self.segment}" + (f", prompt {self.prompt}" if self.prompt is not None else "")
        text = f"{where}: {self.severity} {self.kind}: {self.reason}"
        return text + (f"\n    -> {self.suggestion}" if self.suggestion else "")


@dataclass(frozen=True)
class CoachSettings:
    """Thresholds of the checks.

    token_limit: tokens the text encoder reads (a pipeline's tokenizer overrides it).
    short_words: prompts with fewer words are "far shorter than the advice" (the README's example
        prompts have 50 to 70 words). hard_cut_overlap: below this share of content words in
        common (Jaccard), a switch is a hard cut. max_edit_words: a rewording of more words than
        this (either side) is a different description, not a drifted one.
    """

    token_limit: int = ModelConfig.text_len
    short_words: int = 25
    hard_cut_overlap: float = 0.1
    max_edit_words: int = 3
    chunk_frames: int = CHUNK_FRAMES


@dataclass(frozen=True)
class Coaching:
    """What ``coach`` found.

    findings: all findings, by segment, warnings first. tokens: per segment, per prompt, the token
    count before truncation. token_counter: "umT5 tokenizer" or ``prompt_text.APPROXIMATION``.
    similarity: per segment, the cosine similarity of its text embedding with the previous
    segment's (None for segment 0); None when no pipeline was given.
    """

    findings: tuple[Finding, ...]
    tokens: tuple[tuple[int, ...], ...]
    token_counter: str
    token_limit: int
    similarity: Optional[tuple[Optional[float], ...]] = None

    def for_segment(self, segment: int) -> tuple[Finding, ...]:
        """Findings about ``segment``, warnings first."""
        return tuple(f for f in self.findings if f.segment == segment)

    def by_segment(self) -> list[tuple[Finding, ...]]:
        """``for_segment(i)`` for every segment, in order (empty tuples included)."""
        return [self.for_segment(i) for i in range(len(self.tokens))]

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "warn")

    def __str__(self) -> str:
        n_warn = len(self.warnings)
        lines = [f"prompt coach: {len(self.tokens)} segments, {n_warn} warning{'s' * (n_warn != 1)}, "
                 f"{len(self.findings) - n_warn} note{'s' * (len(self.findings) - n_warn != 1)} "
                 f"(tokens: {self.token_counter})"]
        for i, found in enumerate(self.by_segment()):
            counts = "+".join(str(n) for n in self.tokens[i])
            lines.append(f"segment {i} ({counts} of {self.token_limit} tokens): {'ok' if not found else ''}".rstrip())
            for f in found:
                lines.append(f"  {f.severity:4}  {f.kind}" + (f" (prompt {f.prompt})" if f.prompt is not None else "")
                             + f": {f.reason}")
                if f.suggestion:
                    lines.append(f"        -> {f.suggestion}")
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------------------------
# Checks on the text
# ----------------------------------------------------------------------------------------------

def _main_prompt(segment) -> int:
    """Index of the prompt with the largest weight (the first of equals)."""
    return max(range(len(segment.prompts)), key=lambda k: (segment.prompts[k].weight, -k))


def _main_text(segment) -> str:
    return segment.prompts[_main_prompt(segment)].text


def _length_findings(timeline: Timeline, tokens, limit: int, tokenizer, settings: CoachSettings) -> list[Finding]:
    out = []
    approx = "" if tokenizer is not None else "about "
    for i, seg in enumerate(timeline.segments):
        for k, p in enumerate(seg.prompts):
            n, n_words = tokens[i][k], len(pt.words(p.text))
            if n > limit:
                kept = pt.truncate_to_tokens(p.text, limit, tokenizer)
                out.append(Finding(i, "too_long", "warn",
                                   f"{approx}{n} tokens; the text encoder reads {limit}, so everything after "
                                   f"'...{' '.join(kept.split()[-6:])}' is dropped",
                                   "shorten it, or move what matters to the front", k, kept))
            elif n_words < settings.short_words:
                out.append(Finding(i, "short_prompt", "warn",
                                   f"{n_words} words ({approx}{n} of {limit} tokens): MemFlow reads long, "
                                   f"concrete prompts, and longer ones cost nothing",
                                   "describe the subject's looks and clothes, the place, the light and time of "
                                   "day, the motion and the camera (memflow_nb.extend_prompt, with the [prompt] extra, "
                                   "drafts a longer prompt)", k))
    return out


def _each_prompt(timeline: Timeline, read) -> Iterator[tuple[int, int, object, object]]:
    """(segment, prompt index, prompt, read(prompt text)) for every prompt where `read` finds something."""
    for i, seg in enumerate(timeline.segments):
        for k, p in enumerate(seg.prompts):
            found = read(p.text)
            if found is not None:
                yield i, k, p, found


def _pronoun_findings(timeline: Timeline) -> list[Finding]:
    out = []
    for i, k, p, pronoun in _each_prompt(timeline, pt.starts_with_pronoun):
        # The subject it most likely means: the nearest earlier segment that names one.
        source = next((j for j in range(i - 1, -1, -1) if pt.subject_phrase(_main_text(timeline.segments[j]))),
                      None)
        subject = replacement = None
        if source is not None:
            src = _main_text(timeline.segments[source])
            subject, replacement = pt.subject_phrase(src), pt.copy_description(src, p.text)
        reason = (f"opens with '{pronoun}': each prompt is read on its own, so the model does not know "
                  f"who '{pronoun}' is")
        suggestion = (f"name the subject as segment {source} describes it: '{subject}'" if subject
                      else "name who or what it is, and describe them")
        out.append(Finding(i, "pronoun_start", "warn", reason, suggestion, k, replacement, other=source))
    return out


def _drift_findings(timeline: Timeline, settings: CoachSettings) -> list[Finding]:
    # Every prompt's subject phrase against those of all earlier segments, earliest first: the
    # first description of a subject is the one to keep.
    out = []
    for i, k, p, subject in _each_prompt(timeline, pt.subject_phrase):
        hit = next(((j, q.text, edits) for j in range(i) for q in timeline.segments[j].prompts
                    for edits in [pt.subject_edits(q.text, p.text, max_edit_words=settings.max_edit_words)]
                    if edits), None)
        if hit is None:
            continue
        j, old_text, edits = hit
        out.append(Finding(
            i, "description_drift", "warn",
            f"describes its subject differently from segment {j}: '{pt.mark_edits(subject, edits)}'",
            f"keep the description word for word as in segment {j}: '{pt.subject_phrase(old_text)}'", k,
            pt.copy_description(old_text, p.text), other=j))
    return out


def _segment_text(seg) -> str:
    return " ".join(p.text for p in seg.prompts if p.weight > 0)


def _cut_findings(timeline: Timeline, settings: CoachSettings) -> list[Finding]:
    plays = Counter(timeline.chunk_plan(settings.chunk_frames))
    chunk_s = time_of_chunk(2, settings.chunk_frames) - time_of_chunk(1, settings.chunk_frames)
    out = []
    for i in range(1, len(timeline.segments)):
        prev, seg = timeline.segments[i - 1], timeline.segments[i]
        overlap = pt.word_overlap(_segment_text(prev), _segment_text(seg))
        if overlap >= settings.hard_cut_overlap:
            continue
        shared = sorted(pt.content_words(_segment_text(prev)) & pt.content_words(_segment_text(seg)))
        reason = (f"shares almost nothing with segment {i - 1} ({overlap:.0%} of content words"
                  + (f": {', '.join(shared)})" if shared else ")")
                  + ": the frames just made stay in the model's context, so the new scene tends to grow out of "
                    "the old picture instead of cutting cleanly, and the memory has nothing to help it")
        steps = seg.transition_steps or 0
        if steps:
            out.append(Finding(i, "hard_cut", "info", reason + f"; the {steps}-chunk transition blends the two",
                               f"fine if intended; a bridging segment that keeps segment {i - 1}'s subject or place "
                               f"makes the change gradual", other=i - 1))
        else:
            fit = min(4, max(1, plays[i]))  # a few chunks, never more than the segment plays
            out.append(Finding(i, "hard_cut", "warn", reason,
                               f"for a gradual change set transition_steps (e.g. {fit} chunks = {fit * chunk_s:g} s), "
                               f"or add a bridging segment that keeps segment {i - 1}'s subject or place; keep hard "
                               f"cuts for real cuts", other=i - 1, changes=(("transition_steps", fit),)))
    return out


def _timing_findings(timeline: Timeline, settings: CoachSettings) -> list[Finding]:
    cf = settings.chunk_frames
    plays = Counter(timeline.chunk_plan(cf))
    switches = timeline.effective_switches(cf)
    chunk_s = time_of_chunk(2, cf) - time_of_chunk(1, cf)
    unit = "chunks" if timeline.unit == "chunks" else "s"
    out = []
    for i, seg in enumerate(timeline.segments):
        n, steps = plays[i], seg.transition_steps or 0
        if n == 0:
            nxt = switches[i + 1].chunk if i + 1 < len(switches) else timeline.num_chunks
            out.append(Finding(i, "never_plays", "warn",
                               f"{seg.start:g}-{seg.end:g} {unit} starts at chunk {switches[i].chunk} and so does "
                               + (f"segment {i + 1}" if i + 1 < len(switches) else "the end of the video")
                               + f" (chunk {nxt}): shorter than a chunk ({chunk_s:g} s), it never plays",
                               f"make it at least {chunk_s:g} s long, or remove it"))
        elif i == 0 and steps:
            out.append(Finding(i, "transition_ignored", "info",
                               f"transition_steps = {steps} on the first segment: there is no earlier prompt to "
                               f"blend from, so it starts on its own prompt",
                               "set transition_steps to 0", changes=(("transition_steps", 0),)))
        elif steps > n:
            fit = max(1, n // 2)
            out.append(Finding(i, "transition_too_long", "warn",
                               f"transition_steps = {steps} but the segment plays {n} chunk{'s' * (n != 1)}: its own "
                               f"prompt is never reached, and the next segment starts from a mix",
                               f"use at most {n} transition steps (e.g. {fit}), or make the segment longer",
                               changes=(("transition_steps", fit),)))
    return out


# ----------------------------------------------------------------------------------------------
# With a pipeline: the text embeddings
# ----------------------------------------------------------------------------------------------

def prompt_similarity(pipe, timeline: Timeline) -> tuple[Optional[float], ...]:
    """Per segment, the cosine similarity of its text embedding with the previous segment's
    (None for segment 0).

    A prompt's embedding is the umT5 output ``pipe.text(texts)`` ([N, text_len, dim]) averaged
    over its real tokens (``</s>`` included, padding not); a blend's is the weighted mean of its
    prompts' (weights normalised), as a linear blend of the embeddings would give. Each distinct
    text is encoded once, through the pipeline's prompt cache.
    """
    import torch

    texts = list(dict.fromkeys(p.text for seg in timeline.segments for p in seg.prompts))
    with warnings.catch_warnings():  # an over-long prompt is reported as a finding
        warnings.filterwarnings("ignore", message=r"prompt \d+ has \d+ tokens")
        emb = pipe.text(texts)
        _, mask = pipe.text.tokenizer(texts)
    mask = mask.to(emb.device, torch.float32)[..., None]  # [N, L, 1]
    pooled = dict(zip(texts, (emb.float() * mask).sum(1) / mask.sum(1)))  # text -> [dim]
    vectors = []
    for seg in timeline.segments:
        total = math.fsum(p.weight for p in seg.prompts)
        vectors.append(sum(pooled[p.text] * (p.weight / total) for p in seg.prompts))
    return (None,) + tuple(float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                           for a, b in zip(vectors, vectors[1:]))


def _similarity_findings(similarity, random_weights: bool) -> list[Finding]:
    note = " (random weights: the number means nothing)" if random_weights else ""
    return [Finding(i, "embedding_similarity", "info",
                    f"text embeddings of segments {i - 1} and {i}: cosine similarity {s:.3f}{note}", other=i - 1)
            for i, s in enumerate(similarity) if s is not None]


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def coach(timeline: Timeline, pipe=None, settings: CoachSettings = CoachSettings()) -> Coaching:
    """Check ``timeline`` against MemFlow's prompting advice; see ``KINDS`` for what is checked.

    pipe: a ``Pipeline`` (optional). With it, token counts come from its umT5 tokenizer (else an
    approximation, ``prompt_text.APPROXIMATION``) and ``similarity`` holds the cosine similarity
    of consecutive segments' text embeddings (this runs the text encoder once per new prompt).
    Returns a ``Coaching``; ``.for_segment(i)`` gives one segment's findings.
    """
    if not isinstance(timeline, Timeline):
        raise TypeError(f"coach needs a memflow_nb.Timeline, got {type(timeline).__name__}; "
                        f"build one with Timeline(segments=[...]) or Timeline.from_scope_json(path)")
    tokenizer = pipe.text.tokenizer if pipe is not None else None
    limit = tokenizer.text_len if tokenizer is not None else settings.token_limit
    counter = "umT5 tokenizer" if tokenizer is not None else pt.APPROXIMATION
    tokens = tuple(tuple(pt.count_tokens([p.text for p in seg.prompts], tokenizer)) for seg in timeline.segments)
    findings = (_length_findings(timeline, tokens, limit, tokenizer, settings) + _pronoun_findings(timeline)
                + _drift_findings(timeline, settings) + _cut_findings(timeline, settings)
                + _timing_findings(timeline, settings))
    similarity = None
    if pipe is not None:
        similarity = prompt_similarity(pipe, timeline)
        findings += _similarity_findings(similarity, bool(getattr(pipe, "random_weights", False)))
    order = {"warn": 0, "info": 1}
    findings.sort(key=lambda f: (f.segment, order[f.severity], -1 if f.prompt is None else f.prompt, f.kind))
    return Coaching(tuple(findings), tokens, counter, limit, similarity)


def apply_suggestion(timeline: Timeline, finding: Finding) -> Timeline:
    """``timeline`` with ``finding``'s suggested edit made (its ``replacement`` text and/or its
    segment ``changes``); a new validated Timeline. Raises ValueError for a finding without one."""
    if finding.replacement is None and not finding.changes:
        raise ValueError(f"finding {finding.kind!r} on segment {finding.segment} has no suggested edit; "
                         f"edit the timeline yourself ({finding.suggestion or finding.reason})")
    seg = timeline.segments[finding.segment]
    changes = dict(finding.changes)
    if finding.replacement is not None:
        prompts = list(seg.prompts)
        prompts[finding.prompt] = prompts[finding.prompt].replace(text=finding.replacement)
        changes["prompts"] = tuple(prompts)
    segments = list(timeline.segments)
    segments[finding.segment] = seg.replace(**changes)
    return timeline.replace(segments=tuple(segments))


def copy_subject(timeline: Timeline, source: int, target: int, prompt: Optional[int] = None) -> Optional[Timeline]:
    """``timeline`` with segment ``target``'s prompt (``prompt``, default its main one) made to
    describe its subject word for word as segment ``source``'s main prompt does (its subject
    phrase, or a leading "He" / "She" / "It", is replaced). None when there is nothing to copy:
    ``source`` has no subject phrase the coach can find, or the target prompt has none to replace."""
    src_seg, dst_seg = timeline.segments[source], timeline.segments[target]
    k = _main_prompt(dst_seg) if prompt is None else prompt
    text = pt.copy_description(_main_text(src_seg), dst_seg.prompts[k].text)
    if text is None:
        return None
    return apply_suggestion(timeline, Finding(target, "copy_subject", "info", "", prompt=k, replacement=text))

"""Study metrics: per prompt segment and per run.

Needing no extra model (computed from what a run records):

* bank attention share: the share of self-attention (recorded layers, last denoising step,
  averaged over heads and query frames) that went to memory-bank frames, per chunk.
* retrieval by segment: at each bank compression, which prompt segment the frames kept (all but
  the newly appended one) came from; ``revisit_retrieval`` is that share for the segment a
  returning segment comes back to, and ``revisit_chance`` what picking uniformly among the
  frames recorded so far would give.

A segment *returns* to an earlier, non-adjacent segment whose prompt shares the most words with
it (Jaccard similarity of word sets >= `return_threshold`): a lexical proxy that catches stories
written like "... the potter again at her wheel ..." without any model.

From image/text features (`memflow_nb.eval_models` computes them with CLIP and DINOv2):

* clip_score: 100 x mean cosine similarity of a segment's frames to its prompt (CLIP).
* subject_consistency (DINO) and background_consistency (CLIP image features): VBench's
  formula, the mean over frames t >= 1 of (max(0, cos(f_t, f_0)) + max(0, cos(f_t, f_t-1))) / 2;
  per segment and over the whole video.
* revisit_subject_similarity: cosine of the mean DINO features of a returning segment and of
  the segment it returns to.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np


def chunk_segments(plan: Sequence[int], num_chunks: int) -> list[int]:
    """Segment index of each of `num_chunks` chunks; past the plan's end the last segment goes on."""
    return [plan[min(c, len(plan) - 1)] for c in range(num_chunks)]


def segment_spans(chunk_segment: Sequence[int]) -> list[tuple[int, int, int]]:
    """(segment, first chunk, end chunk) of every segment that plays, in order."""
    spans = []
    for c, s in enumerate(chunk_segment):
        if spans and spans[-1][0] == s:
            spans[-1] = (s, spans[-1][1], c + 1)
        else:
            spans.append((s, c, c + 1))
    return spans


# -- attention ---------------------------------------------------------------------------------

def bank_attention_share(summaries) -> dict[int, float]:
    """Per chunk, the mean share of attention on bank frames over the recorded denoising summaries
    (`AttentionRecording.self_attention_summaries`; batch item 0)."""
    per_chunk: dict[int, list[float]] = {}
    for s in summaries:
        if s.kind == "denoise":
            per_chunk.setdefault(s.chunk, []).append(float(s.group_mass()["bank"][0].mean()))
    return {c: float(np.mean(v)) for c, v in sorted(per_chunk.items())}


# -- returns and retrieval ------------------------------------------------------------------------

def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}


def prompt_returns(texts: Sequence[str], threshold: float = 0.5) -> list[Optional[int]]:
    """For each segment, the earlier non-adjacent segment it comes back to (None: none).

    The candidate with the largest word-set Jaccard similarity wins if it reaches `threshold`
    (ties: the earliest).
    """
    words = [_words(t) for t in texts]
    out: list[Optional[int]] = []
    for j, wj in enumerate(words):
        best, best_sim = None, threshold
        for i in range(j - 1):
            union = words[i] | wj
            sim = len(words[i] & wj) / len(union) if union else 0.0
            if sim >= best_sim and (best is None or sim > best_sim):
                best, best_sim = i, sim
        out.append(best)
    return out


def retrieval_by_segment(events, chunk_segment: Sequence[int], chunk_frames: int,
                         num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the frames kept at bank compressions came from.

    Args:
        events: memory events (`MemoryEvent`, batch item 0 is read) in order.
        chunk_segment: segment index per chunk.
    Returns:
        (kept [S, S], chance [S, S]) float arrays: kept[j, i] counts bank entries (over layers and
        compressions during segment j) holding a frame of segment i, newest frame excluded;
        chance[j, i] is the count uniform picks among the distinct frames recorded before each
        compression would give.
    """
    S = num_segments
    kept, chance = np.zeros((S, S)), np.zeros((S, S))

    def seg_of_frame(f: int) -> int:
        return chunk_segment[min(f // chunk_frames, len(chunk_segment) - 1)]

    recorded: list[int] = []
    for ev in events:
        if ev.kind == "compress" and ev.chunk < len(chunk_segment):
            j = chunk_segment[ev.chunk]
            after = ev.frames_after[:, 0].tolist()  # [L][n]
            n_kept = 0
            for layer in after:
                for f in layer:
                    if f >= 0 and f != ev.new_frame:
                        kept[j, seg_of_frame(f)] += 1
                        n_kept += 1
            pool = [f for f in recorded if f != ev.new_frame]
            for f in pool:
                chance[j, seg_of_frame(f)] += n_kept / len(pool)
        if ev.new_frame >= 0 and ev.new_frame not in recorded:
            recorded.append(ev.new_frame)
    return kept, chance


def _share(row: np.ndarray, i: int) -> float:
    total = row.sum()
    return float(row[i] / total) if total > 0 else math.nan


def memory_metrics(spans, texts: Sequence[str], chunk_share: dict[int, float], events, chunk_segment,
                   chunk_frames: int, return_threshold: float = 0.5) -> tuple[dict, list[dict]]:
    """Run-level and per-segment metrics that need no extra model.

    Args:
        spans: `segment_spans(chunk_segment)`; texts: the prompt of each segment (timeline order).
        chunk_share: `bank_attention_share(...)`; events: every memory event of the run.
    Returns:
        (run metrics {name: float}, per-segment dicts in span order).
    """
    returns = prompt_returns(texts, return_threshold)
    kept, chance = retrieval_by_segment(events, chunk_segment, chunk_frames, len(texts))
    segments, pairs = [], []
    for s, a, b in spans:
        shares = [chunk_share[c] for c in range(a, b) if c in chunk_share]
        earlier = kept[s, :s].sum() / kept[s].sum() if kept[s].sum() > 0 else math.nan
        r = returns[s]
        seg = {"segment": s, "start_chunk": a, "end_chunk": b, "prompt": texts[s],
               "returns_to": r, "bank_attention_share": float(np.mean(shares)) if shares else math.nan,
               "kept_from_earlier_segments": float(earlier),
               "revisit_retrieval": _share(kept[s], r) if r is not None else math.nan,
               "revisit_chance": _share(chance[s], r) if r is not None else math.nan}
        segments.append(seg)
        if r is not None and not math.isnan(seg["revisit_retrieval"]):
            pairs.append((seg["revisit_retrieval"], seg["revisit_chance"]))
    values = list(chunk_share.values())
    run = {"bank_attention_share": float(np.mean(values)) if values else math.nan,
           "compressions": sum(1 for e in events if e.kind == "compress"),
           "returns": sum(1 for s, _, _ in spans if returns[s] is not None),
           "revisit_retrieval": float(np.mean([p[0] for p in pairs])) if pairs else math.nan,
           "revisit_chance": float(np.mean([p[1] for p in pairs])) if pairs else math.nan}
    return run, segments


# -- feature metrics -------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def consistency(features: np.ndarray) -> float:
    """VBench's temporal consistency of features [N, d]: mean over t >= 1 of
    (max(0, cos(f_t, f_0)) + max(0, cos(f_t, f_t-1))) / 2 (NaN below two frames)."""
    f = _unit(features)
    if len(f) < 2:
        return math.nan
    first = np.maximum(f[1:] @ f[0], 0)
    prev = np.maximum(np.sum(f[1:] * f[:-1], axis=-1), 0)
    return float(np.mean((first + prev) / 2))


def clip_score(image_features: np.ndarray, text_feature: np.ndarray) -> float:
    """100 x the mean cosine similarity of frames [N, d] to one text [d] (NaN without frames)."""
    if len(image_features) == 0:
        return math.nan
    return float(100 * np.mean(_unit(image_features) @ _unit(text_feature)))


def feature_metrics(spans, frame_segment: Sequence[int], clip_images: np.ndarray, clip_texts: np.ndarray,
                    dino: np.ndarray, returns: Sequence[Optional[int]]) -> tuple[dict, list[dict]]:
    """CLIP score and consistencies per segment and per run.

    Args:
        frame_segment: segment of each sampled frame [N]; clip_images [N, d]; dino [N, d'];
        clip_texts: [n_segments, d] one text feature per segment (timeline order).
        returns: `prompt_returns(...)`.
    Returns:
        (run metrics, per-segment dicts in span order).
    """
    seg_of = np.asarray(frame_segment)
    segments, sims = [], []
    for s, _, _ in spans:
        m = seg_of == s
        seg = {"clip_score": clip_score(clip_images[m], clip_texts[s]),
               "subject_consistency": consistency(dino[m]),
               "background_consistency": consistency(clip_images[m])}
        r = returns[s]
        if r is not None and m.any() and (seg_of == r).any():
            a, b = _unit(dino[m].mean(0)), _unit(dino[seg_of == r].mean(0))
            seg["revisit_subject_similarity"] = float(a @ b)
            sims.append(seg["revisit_subject_similarity"])
        else:
            seg["revisit_subject_similarity"] = math.nan
        segments.append(seg)
    scores = [s["clip_score"] for s in segments if not math.isnan(s["clip_score"])]
    run = {"clip_score": float(np.mean(scores)) if scores else math.nan,
           "subject_consistency": consistency(dino), "background_consistency": consistency(clip_images),
           "revisit_subject_similarity": float(np.mean(sims)) if sims else math.nan}
    return run, segments


def bank_report(events, stays) -> dict:
    """The bank history of a run as JSON-ready data (batch item 0): every refresh with the frame
    in each layer's slots before and after and the NAM scores, and each frame's stays."""
    def rows(t):
        return None if t is None else t[:, 0].tolist()

    return {
        "events": [{"chunk": e.chunk, "kind": e.kind, "new_frame": e.new_frame, "text_zeroed": e.text_zeroed,
                    "frames_before": rows(e.frames_before), "frames_after": rows(e.frames_after),
                    "scores": rows(e.scores)} for e in events],
        "stays": [{"layer": s.layer, "frame": s.frame, "entered": s.entered, "left": s.left,
                   "scores": [list(x) for x in s.scores]} for s in stays],
    }

"""One run of a study: generate the video while recording attention and bank refreshes, compute
the metrics, and publish the run's folder (see `memflow_nb.study_store`).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

from . import metrics as M
from .engine.config import StreamConfig
from .study_plan import Run
from .study_store import StudyStore, jsonable, now, write_json


def run_one(store: StudyStore, run: Run, pipe, height, width, layers, save_attention, evaluator, eval_every,
         return_threshold, bar, ranks) -> tuple[str, Optional[str]]:
    """Make one run's files and publish them; on an error record it and go on. Ctrl-C and other
    BaseExceptions remove the partial folder and propagate."""
    base = {"run_id": run.id, "story": run.story.id, "source": run.story.source, "line": run.story.line,
            "setting": run.setting.name, "seed": run.seed, "rank": ranks.rank, "host": socket.gethostname(),
            "pid": os.getpid()}
    stream = run.setting.apply(pipe.stream if pipe is not None else StreamConfig())
    base["stream"] = dataclasses.asdict(stream)
    if run.story.error is not None:
        store.fail(run.id, {**base, "status": "failed", "error": run.story.error, "finished": now()})
        return "failed", run.story.error
    tmp = None
    try:
        tmp = store.begin(run.id)
        record = _generate(tmp, run, dataclasses.replace(pipe, stream=stream), height, width, layers, save_attention,
                           evaluator, eval_every, return_threshold, bar)
        store.commit(tmp, run.id, {**base, **record, "status": "ok", "error": None, "finished": now()})
        return "ok", None
    except Exception as e:  # recorded; the study goes on with the next run
        store.abandon(tmp)
        error = f"{type(e).__name__}: {e}"
        store.fail(run.id, {**base, "status": "failed", "error": error, "finished": now(),
                            "traceback": traceback.format_exc()[-4000:]})
        _free_memory(ranks.device)
        return "failed", error
    except BaseException:
        store.abandon(tmp)
        raise


def _free_memory(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def _generate(tmp: Path, run: Run, pipe, height, width, layers, save_attention, evaluator, eval_every,
              return_threshold, bar) -> dict:
    """Generate one run into `tmp`; returns the record's facts and metrics."""
    from .generation import generate, render_size
    from .recording import bank_history, record_attention
    from .video import FPS, VideoFile

    timeline, stream = run.story.timeline, pipe.stream
    h, w = render_size(pipe, timeline, height, width)
    steps = timeline.denoising_steps or stream.denoising_steps
    plan = M.chunk_segments(timeline.chunk_plan(stream.chunk_frames), run.num_chunks)
    spans = M.segment_spans(plan)
    texts = [max(seg.prompts, key=lambda p: p.weight).text for seg in timeline.segments]
    sampled, sampled_segment, switches, n_frames = [], [], [], 0
    t0 = time.perf_counter()
    with record_attention(pipe.model, layers=layers, steps=[len(steps) - 1], cross=False) as rec:
        with VideoFile(tmp / "video.mp4", (h, w), FPS) as video:
            for ch in generate(pipe, timeline, seed=run.seed, height=h, width=w, num_chunks=run.num_chunks,
                               progress=False):
                video.add(ch.frames)
                if evaluator is not None:
                    for t in range(len(ch.frames)):
                        if (n_frames + t) % eval_every == 0:
                            sampled.append(ch.frames[t])
                            sampled_segment.append(plan[ch.index])
                n_frames += len(ch.frames)
                if ch.switched:
                    switches.append(ch.index)
                bar.update(1)
    seconds = time.perf_counter() - t0
    events = rec.memory_events
    timeline.replace(seed=run.seed).to_scope_json(tmp / "timeline.scope.json")
    chunk_share = M.bank_attention_share(rec.self_attention_summaries)
    kept, chance = M.retrieval_by_segment(events, plan, stream.chunk_frames, len(texts))
    report = {**M.bank_report(events, bank_history(events)), "attention_share_per_chunk": chunk_share,
              "retrieval_by_segment": {"kept": kept.tolist(), "chance": chance.tolist()}}
    write_json(tmp / "bank.json", report, atomic=False)
    if save_attention:
        _save_attention(tmp / "attention.npz", rec.self_attention_summaries)
    run_metrics, segments = M.memory_metrics(spans, texts, chunk_share, events, plan, stream.chunk_frames,
                                             return_threshold)
    if evaluator is not None:
        feats = evaluator.features(np.stack(sampled), texts)
        extra, extra_segments = M.feature_metrics(spans, sampled_segment, feats.clip_images, feats.clip_texts,
                                                  feats.dino, M.prompt_returns(texts, return_threshold))
        run_metrics.update(extra)
        segments = [{**a, **b} for a, b in zip(segments, extra_segments)]
    return {"model": getattr(pipe, "name", None), "height": h, "width": w, "chunks": run.num_chunks,
            "frames": n_frames, "seconds": round(seconds, 3), "generated_fps": round(n_frames / seconds, 3),
            "switch_chunks": switches, "attention_layers": layers, "attention_truncated": rec.truncated,
            "eval_models": list(evaluator.names) if evaluator is not None else None,
            "files": sorted(p.name for p in tmp.iterdir()),
            "metrics": jsonable(run_metrics), "segments": jsonable(segments)}


def _save_attention(path: Path, summaries) -> None:
    """Pooled attention per recorded pass: group mass [n, H, query frames, 4] (sink, bank, local,
    current; batch item 0) with the chunk, layer and step of each."""
    import torch

    groups = ("sink", "bank", "local", "current")
    rows = [s for s in summaries if s.kind == "denoise"]
    mass = [torch.stack([s.group_mass()[g][0] for g in groups], -1).numpy() for s in rows]
    with open(path, "wb") as f:
        np.savez(f, groups=np.array(groups), chunk=np.array([s.chunk for s in rows], dtype=np.int64),
                 layer=np.array([s.layer for s in rows], dtype=np.int64),
                 step=np.array([s.step for s in rows], dtype=np.int64),
                 group_mass=np.stack(mass) if mass else np.zeros((0, 0, 0, len(groups)), np.float32))

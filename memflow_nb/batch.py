"""Studies: many videos from prompt files x stream settings x seeds, with metrics and one table.

    python -m memflow_nb batch prompts.jsonl --out study/ --settings "off:bank_size=0|on:|sma:sma=on" --seeds 0-2
    torchrun --nproc_per_node 8 -m memflow_nb.batch prompts.jsonl --out study/ --settings ...

INPUT is an official MemFlow .jsonl (one story per line, switched at --switch-frames), a Scope
timeline .json, or a folder of them. One run = (story, setting, seed): its MP4, the timeline it
used, its bank history with retrieval scores, optional pooled attention, and a metrics record
land in OUT/runs/RUN_ID/ (see `memflow_nb.study_store` for the layout); OUT/results.parquet has
one row per run and OUT/segments.parquet one per prompt segment.

Under torchrun the runs are split over the processes, longest first; each writes its own run
folders and rank 0 merges the table once all are done. A rerun skips finished runs and redoes
unfinished or failed ones, so an interrupted study (Ctrl-C, a killed process, a lost node) loses
only the runs that were in progress.

Several machines: start the same command on every node with torchrun's rendezvous, e.g. on 2
nodes of 8 GPUs, with OUT on a filesystem all nodes share:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        --rdzv_id study1 -m memflow_nb.batch prompts.jsonl --out /shared/study --local-dir /shared/memflow
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence, Union

from . import ranks as R
from .timeline.clock import chunks_for_frames
from .timeline.official import DEFAULT_OFFICIAL_LATENT_FRAMES, DEFAULT_SWITCHES
from .engine.config import StreamConfig
from .study_plan import Run, StudyInputError, parse_seeds, parse_settings, plan_runs, read_stories, shard
from .study_run import run_one
from .study_store import StudyStore, check_table_format, now


def run_study(input: Union[str, os.PathLike], out: Union[str, os.PathLike], *, settings=None, seeds=None,
              model: str = "memflow", pipe=None, height: Optional[int] = None, width: Optional[int] = None,
              frames: Optional[int] = None, switch_frames: Sequence[int] = DEFAULT_SWITCHES,
              attention_layers: Union[str, Sequence[int]] = "auto", save_attention: bool = False,
              evaluator=None, eval_every: int = 4, return_threshold: float = 0.5, table: str = "parquet",
              retry_failed: bool = True, merge_only: bool = False, progress: bool = True,
              local_dir=None, device: Optional[str] = None, text_encoder_mode: str = "auto",
              timeout: timedelta = timedelta(hours=72)) -> dict:
    """Run (or resume) a study and return its manifest (see the module docstring).

    Args:
        input: .jsonl / .json / folder. settings: a spec string or .json file (`memflow_nb.study_plan`).
        seeds: "0,1" / "0-3" / a list; None: each story's own seed, else 0.
        model, local_dir, device, text_encoder_mode: as in `memflow_nb.load`; or `pipe`, an
            already loaded pipeline (single process).
        height, width, frames, switch_frames: as in `python -m memflow_nb generate`.
        attention_layers: layers whose attention is recorded (last denoising step) for the bank
            attention share: "auto" (first, middle, last), "all", "none" or indices.
        save_attention: also keep the pooled attention per run (attention.npz).
        evaluator: a `memflow_nb.eval_models.Evaluator`, or a dict of `load_evaluator` arguments
            (loaded on each rank's device), for CLIP score and consistency metrics; None: skip them.
        eval_every: metrics read every this many video frames.
        table: "parquet" (needs pyarrow: memflow_nb[study]) or "csv".
        retry_failed: redo runs that failed before (finished runs are always kept).
        merge_only: write the tables and manifest from what is on disk, run nothing.
    """
    ranks = R.start(device, timeout)
    try:
        return _study(ranks, **{k: v for k, v in locals().items() if k not in ("ranks", "device", "timeout")})
    finally:
        R.stop(ranks)


def _study(ranks: R.Ranks, *, input, out, settings, seeds, model, pipe, height, width, frames, switch_frames,
           attention_layers, save_attention, evaluator, eval_every, return_threshold, table, retry_failed,
           merge_only, progress, local_dir, text_encoder_mode) -> dict:
    store = StudyStore(out)
    plan = None
    if ranks.rank == 0:
        try:
            plan = _plan(store, input, settings, seeds, model if pipe is None else pipe.name, height, width, frames,
                         switch_frames, attention_layers, evaluator, eval_every, return_threshold, table)
            todo = [r.id for r in plan[0] if not store.is_done(r.id) and (retry_failed or not store.has_failed(r.id))]
            if model == "memflow" and pipe is None and not merge_only and todo:
                from .weights import fetch_weights

                fetch_weights(local_dir, progress=progress)  # download once, before the other ranks load
            plan = ("ok",) + plan + (todo,)
        except Exception as e:  # handed to every rank, so none waits for a plan that never comes
            plan = ("error", str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
    plan = R.broadcast(ranks, plan)
    if plan[0] == "error":
        raise StudyInputError(plan[1])
    _, runs, grid_fields, todo = plan
    todo_runs = [r for r in runs if r.id in set(todo)] if not merge_only else []
    mine = shard(todo_runs, ranks.world)[ranks.rank]
    t0 = time.perf_counter()
    done = _run_all(ranks, store, mine, pipe, model, local_dir, text_encoder_mode, height, width,
                    attention_layers, save_attention, evaluator, eval_every, return_threshold, progress)
    mine_log = {"rank": ranks.rank, "host": socket.gethostname(), "pid": os.getpid(), "runs": done,
                "seconds": round(time.perf_counter() - t0, 2)}
    logs = R.gather(ranks, mine_log)  # waits for every rank
    manifest = None
    if ranks.rank == 0:
        invocation = {"finished": now(), "world_size": ranks.world, "ranks": logs}
        stories = {r.story.id: r.story for r in runs}.values()
        manifest = store.merge([r.id for r in runs], table, grid_fields, invocation,
                               [{"id": s.id, "source": s.source, "line": s.line, "error": s.error} for s in stories])
    return R.broadcast(ranks, manifest)


def _plan(store, input, settings, seeds, model, height, width, frames, switch_frames, attention_layers,
          evaluator, eval_every, return_threshold, table):
    check_table_format(table)
    if frames is not None and frames < 1:
        raise StudyInputError(f"--frames {frames} must be >= 1")
    if eval_every < 1:
        raise StudyInputError(f"--eval-every {eval_every} must be >= 1")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v <= 0 or v % 16):
            raise StudyInputError(f"--{name} {v} must be a positive multiple of 16")
    base = StreamConfig()
    variants = parse_settings(settings, base)
    seed_list = parse_seeds(seeds) if isinstance(seeds, (str, type(None))) else tuple(int(s) for s in seeds)
    chunks = chunks_for_frames(frames, base.chunk_frames) if frames else None
    latent = base.chunk_frames * chunks if chunks else DEFAULT_OFFICIAL_LATENT_FRAMES
    stories = read_stories(input, [int(s) for s in switch_frames], latent)
    runs = plan_runs(stories, variants, seed_list, chunks)
    store.prepare()
    store.remove_partial()  # left by an interrupted job: its runs are redone
    store.check_options({"model": model, "height": height, "width": width, "frames": frames,
                         "switch_frames": [int(s) for s in switch_frames], "attention_layers": _layer_spec(attention_layers),
                         "eval": _eval_names(evaluator), "eval_every": eval_every, "return_threshold": return_threshold})
    grid_fields = list(dict.fromkeys(k for s in variants for k, _ in s.overrides))
    return runs, grid_fields


def _layer_spec(layers) -> Union[str, list]:
    if isinstance(layers, str) and layers in ("auto", "none", "all"):
        return layers
    try:
        return [int(x) for x in (layers.split(",") if isinstance(layers, str) else layers) if str(x).strip()]
    except ValueError:
        raise StudyInputError(f"--attention-layers {layers!r}: use auto, all, none or indices like 0,15,29") from None


def _layers(spec, num_layers: int) -> Optional[list[int]]:
    """Recorded layers: a list (empty: none), or None for all."""
    spec = _layer_spec(spec)
    if isinstance(spec, str):
        return {"auto": sorted({0, num_layers // 2, num_layers - 1}), "none": [], "all": None}[spec]
    bad = [l for l in spec if not 0 <= l < num_layers]
    if bad:
        raise StudyInputError(f"--attention-layers {bad}: the model has layers 0..{num_layers - 1}")
    return sorted(set(spec))


def _eval_names(evaluator) -> Optional[list[str]]:
    if evaluator is None:
        return None
    from .eval_models import model_names

    return list(model_names(**evaluator) if isinstance(evaluator, dict) else evaluator.names)


def _run_all(ranks, store, runs: list[Run], pipe, model, local_dir, text_encoder_mode, height, width,
             attention_layers, save_attention, evaluator, eval_every, return_threshold, progress) -> list[dict]:
    if not runs:
        return []
    if pipe is None and any(r.story.error is None for r in runs):
        from .pipeline import load

        pipe = load(model, local_dir=local_dir, device=ranks.device,
                    text_encoder_mode=text_encoder_mode,
                    progress=progress and ranks.rank == 0)
    if isinstance(evaluator, dict):
        from .eval_models import load_evaluator

        evaluator = load_evaluator(**{"device": ranks.device, **evaluator})
    layers = _layers(attention_layers, pipe.model.cfg.num_layers) if pipe is not None else []
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(max(1, r.num_chunks) for r in runs), unit="chunk", position=ranks.rank,
               desc=f"rank {ranks.rank}/{ranks.world}" if ranks.distributed else "study", disable=not progress)
    log, chunks_done = [], 0
    try:
        for i, run in enumerate(runs):
            bar.set_postfix_str(f"run {i + 1}/{len(runs)}")
            t0 = time.perf_counter()
            status, error = run_one(store, run, pipe, height, width, layers, save_attention, evaluator, eval_every,
                                 return_threshold, bar, ranks)
            chunks_done += max(1, run.num_chunks)
            bar.update(chunks_done - bar.n)  # a failed run's chunks count as done, for the ETA
            log.append({"run_id": run.id, "status": status, "seconds": round(time.perf_counter() - t0, 2)})
            line = f"{'done' if status == 'ok' else 'FAILED'} {run.id} ({log[-1]['seconds']} s)"
            line += f": {error}" if error else ""
            bar.write(line) if progress else print(line, flush=True)
    finally:
        bar.close()
    return log


# -- command line -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memflow_nb batch",
        description="Run a study: every story of INPUT under every setting and seed, with metrics and one "
                    "results table. Under torchrun the runs are split over the processes.",
        epilog="Settings: 'bank_size=0,3;sma=off,on' is a grid (4 variants); 'off:bank_size=0|on:|sma:sma=on' "
               "three named variants; or a .json file {NAME: {field: value}}. Fields are StreamConfig's.")
    p.add_argument("input", type=Path, help="official .jsonl, Scope timeline .json, or a folder of them")
    p.add_argument("--out", type=Path, required=True, help="study folder (created; a rerun resumes it)")
    p.add_argument("--settings", help="stream settings variants (see below; default: the pipeline's own)")
    p.add_argument("--seeds", help="noise seeds, e.g. 0,1,2 or 0-9 (default: each story's, else 0)")
    p.add_argument("--model", choices=["memflow", "tiny"], default="memflow",
                   help="memflow: the real weights; tiny: random weights, CPU, noise (for trying the tool)")
    p.add_argument("--height", type=int, help="video height in pixels, a multiple of 16")
    p.add_argument("--width", type=int, help="video width in pixels, a multiple of 16")
    p.add_argument("--frames", type=int, help="make at least this many video frames per run (whole chunks)")
    p.add_argument("--switch-frames", default=",".join(map(str, DEFAULT_SWITCHES)),
                   help="official .jsonl only: latent-frame switch indices (default %(default)s)")
    p.add_argument("--local-dir", type=Path, help="read weights from this folder (see README, Weights)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--text-encoder-mode", default="auto", choices=["auto", "gpu", "streamed", "cpu"],
                   help="where umT5 runs (auto: the memory plan picks, see memflow_nb.plan)")
    p.add_argument("--attention-layers", default="auto",
                   help="layers recorded for the bank attention share: auto (first, middle, last), all, none, "
                        "or indices like 0,15,29")
    p.add_argument("--save-attention", action="store_true", help="keep pooled attention per run (attention.npz)")
    p.add_argument("--eval", action="store_true",
                   help="CLIP score and subject/background consistency (pip install 'memflow_nb[eval]')")
    p.add_argument("--clip-model", help="CLIP hub id or folder (default openai/clip-vit-base-patch32)")
    p.add_argument("--clip-revision", help="CLIP hub revision (default: a pinned commit)")
    p.add_argument("--dino-model", help="DINOv2 hub id or folder (default facebook/dinov2-base)")
    p.add_argument("--dino-revision", help="DINOv2 hub revision (default: a pinned commit)")
    p.add_argument("--eval-every", type=int, default=4, help="metrics read every N-th video frame (default 4)")
    p.add_argument("--return-threshold", type=float, default=0.5,
                   help="word overlap (Jaccard) at which a segment counts as returning to an earlier one")
    p.add_argument("--table", choices=["parquet", "csv"], default="parquet", help="results table format")
    p.add_argument("--no-retry-failed", action="store_true", help="leave runs that failed before as they are")
    p.add_argument("--merge-only", action="store_true", help="only rewrite the tables and manifest")
    p.add_argument("--timeout-hours", type=float, default=72.0,
                   help="how long a rank that is done waits for the others (default 72)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per run instead)")
    return p


def _evaluator_spec(args) -> Optional[dict]:
    if not args.eval:
        return None
    given = {"clip": args.clip_model, "clip_revision": args.clip_revision, "dino": args.dino_model,
             "dino_revision": args.dino_revision}
    return {k: v for k, v in given.items() if v is not None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m memflow_nb batch ...`: 0 when every run is done, 1 when some failed, 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        switches = [int(s) for s in args.switch_frames.split(",") if s.strip()]
    except ValueError:
        print(f"error: --switch-frames {args.switch_frames!r} must be integers separated by commas", file=sys.stderr)
        return 2
    try:
        manifest = run_study(
            args.input, args.out, settings=args.settings, seeds=args.seeds, model=args.model, height=args.height,
            width=args.width, frames=args.frames, switch_frames=switches, attention_layers=args.attention_layers,
            save_attention=args.save_attention, evaluator=_evaluator_spec(args), eval_every=args.eval_every,
            return_threshold=args.return_threshold, table=args.table, retry_failed=not args.no_retry_failed,
            merge_only=args.merge_only, progress=not args.no_progress, local_dir=args.local_dir, device=args.device,
            text_encoder_mode=args.text_encoder_mode, timeout=timedelta(hours=args.timeout_hours))
    except StudyInputError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; rerun the same command to go on", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the study (a non-zero rank would make torchrun stop the others)
    print(f"{args.out}: {manifest['ok']} runs done, {manifest['failed']} failed, {manifest['pending']} pending "
          f"of {manifest['runs_planned']}; table {args.out / manifest['tables']['results']}")
    for r in manifest["runs"]:
        if r["status"] == "failed":
            print(f"  failed {r['id']}: {(StudyStore(args.out).record(r['id']) or {}).get('error')}", file=sys.stderr)
    return 0 if manifest["failed"] == 0 and manifest["pending"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

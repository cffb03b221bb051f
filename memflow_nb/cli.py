"""Command line: `python -m memflow_nb generate TIMELINE -o OUT.mp4 [options]`.

Bad input ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence



class UsageError(Exception):
    """A problem with the user's input: printed as one line."""


def _parser() -> argparse.ArgumentParser:
    from .timeline.official import DEFAULT_SWITCHES

    p = argparse.ArgumentParser(prog="python -m memflow_nb", description="MemFlow streaming text-to-video.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make a video from a prompt timeline",
                       description="Generate a video from a Scope timeline (.json) or an official MemFlow "
                                   "prompt file (.jsonl, one video per line).")
    g.add_argument("timeline", type=Path, help="Scope timeline .json or official .jsonl")
    g.add_argument("-o", "--output", type=Path, required=True, help="output video (.mp4, or .gif for previews)")
    g.add_argument("--seed", type=int, help="noise seed (default: the timeline's, else 0)")
    g.add_argument("--height", type=int, help="video height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, help="video width in pixels, a multiple of 16")
    g.add_argument("--frames", type=int, help="make at least this many video frames (rounded up to whole chunks)")
    g.add_argument("--model", choices=["memflow", "tiny"], default="memflow",
                   help="memflow: the real weights (downloaded once); tiny: a random-weight model that runs "
                        "offline on a CPU in seconds and shows noise, not pictures")
    g.add_argument("--switch-frames", type=str, default=",".join(map(str, DEFAULT_SWITCHES)),
                   help="official .jsonl only: latent-frame switch indices (default %(default)s)")
    g.add_argument("--line", type=int, default=0, help="official .jsonl only: which line (video) to make")
    g.add_argument("--local-dir", type=Path, help="read weights from this folder (see README, Weights)")
    g.add_argument("--device", type=str, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _read_timeline(args):
    from .timeline.clock import CHUNK_FRAMES, chunks_for_frames
    from .timeline.model import Timeline, TimelineError
    from .timeline.official import DEFAULT_OFFICIAL_LATENT_FRAMES, from_official_jsonl

    path: Path = args.timeline
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".jsonl":
            switches = [int(s) for s in args.switch_frames.split(",") if s.strip()]
            latent = CHUNK_FRAMES * chunks_for_frames(args.frames) if args.frames else DEFAULT_OFFICIAL_LATENT_FRAMES
            timelines = from_official_jsonl(path, switches, num_latent_frames=latent)
            if not 0 <= args.line < len(timelines):
                raise UsageError(f"{path}: --line {args.line} is out of range (the file has {len(timelines)} lines)")
            return timelines[args.line]
        return Timeline.from_scope_json(path)
    except TimelineError as e:
        fields = "; ".join(f"{loc}: {msg}" for loc, msg in e.errors) or str(e)
        raise UsageError(f"{path}: invalid timeline: {fields}") from None
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None


def _generate(args) -> int:
    import torch

    from .engine.config import latent_size
    from .generation import Session, render_size
    from .pipeline import load
    from .timeline.clock import FPS, chunks_for_frames
    from .timeline.conditioning import switch_summary
    from .video import VideoFile, _codec

    timeline = _read_timeline(args)
    try:
        _codec(args.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames {args.frames} must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tiny":
        print("model: tiny random-weight model (offline, CPU): the video shows noise, not pictures", flush=True)
        pipe = load("tiny", device=device)
    else:
        pipe = load("memflow", local_dir=args.local_dir, device=device, progress=not args.no_progress)
    height, width = render_size(pipe, timeline, args.height, args.width)
    from .engine.checks import check_memory, check_seed

    try:
        h, w = latent_size(height, width)
        if args.seed is not None:
            check_seed(args.seed)
        check_memory(pipe.model, pipe.stream, h, w, 1)  # refuse sizes that cannot fit, before any work
    except (ValueError, TypeError) as e:
        raise UsageError(f"--seed {args.seed}: {e}" if "seed" in str(e) else str(e)) from None
    chunks = chunks_for_frames(args.frames, pipe.stream.chunk_frames) if args.frames else timeline.num_chunks
    t0 = time.perf_counter()
    # No checkpoints and no frames kept: the video goes to the file, memory stays flat however long.
    session = Session(pipe, checkpoints=None, keep_frames=False, progress=not args.no_progress)
    with VideoFile(args.output, (height, width), FPS) as out:
        for ch in session.generate(timeline, seed=args.seed, height=height, width=width, num_chunks=chunks):
            out.add(ch.frames)
        written = out.frames_written
    secs = time.perf_counter() - t0
    print(f"wrote {args.output}: {written} frames ({written / FPS:.1f} s at {FPS} fps), {width}x{height}, "
          f"{chunks} chunks; {switch_summary(timeline, chunks, pipe.stream.chunk_frames)}; "
          f"generated in {secs:.1f} s ({written / secs:.1f} frames/s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:  # studies: memflow_nb.batch has its own options
        return __import__("memflow_nb.batch", fromlist=["main"]).main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except UsageError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, OSError) as e:
        # Missing weights or unreadable files also end in one line.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1

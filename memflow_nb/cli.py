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


def _prog() -> str:
    """The name the user typed: `memflow-nb` for the console script, else `python -m memflow_nb`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("memflow-nb") else "python -m memflow_nb"


def _parser() -> argparse.ArgumentParser:
    from .timeline.official import DEFAULT_SWITCHES

    p = argparse.ArgumentParser(prog=_prog(), description="MemFlow streaming text-to-video.")
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
    g.add_argument("--debug", action="store_true", help="show the full traceback of an error "
                                                       "(also MEMFLOW_NB_DEBUG=1)")
    return p


def _read_timeline(args):
    from .timeline.clock import CHUNK_FRAMES, chunks_for_frames
    from .timeline.model import Timeline, TimelineError
    from .timeline.official import DEFAULT_OFFICIAL_LATENT_FRAMES, from_official_jsonl

    path: Path = args.timeline
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a timeline file (.json or .jsonl)")
    if not path.exists():
        if path.is_symlink():
            raise UsageError(f"{path}: a symbolic link to nothing (or a loop of links); point it at a timeline file")
        raise UsageError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".jsonl":
            try:
                switches = [int(s) for s in args.switch_frames.split(",") if s.strip()]
            except ValueError:
                raise UsageError(f"--switch-frames {args.switch_frames!r}: give latent-frame numbers separated by "
                                 f"commas, e.g. 40,80") from None
            latent = CHUNK_FRAMES * chunks_for_frames(args.frames) if args.frames else DEFAULT_OFFICIAL_LATENT_FRAMES
            timelines = from_official_jsonl(path, switches, num_latent_frames=latent)
            if not 0 <= args.line < len(timelines):
                raise UsageError(f"{path}: --line {args.line} is out of range (the file has {len(timelines)} lines)")
            return timelines[args.line]
        return Timeline.from_scope_json(path)
    except TimelineError as e:
        never = [m for loc, m in e.errors if loc.startswith("switch_frame_indices") and "never reached" in m]
        if never and args.frames:
            raise UsageError(f"--frames {args.frames} ends before a prompt switch ({never[0]}); give more "
                             f"--frames or fewer --switch-frames (now {args.switch_frames})") from None
        fields = "; ".join(e.summary())
        fields = fields.replace("num_latent_frames", "--frames (in latent frames)")
        fields = fields.replace("switch_frame_indices", "--switch-frames")
        raise UsageError(f"{path}: invalid timeline: {fields}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None


def _check_args(args) -> None:
    """Refuse bad options before reading weights: every mistake found here costs nothing."""
    from .engine.checks import check_seed
    from .engine.config import latent_size
    from .video import _codec

    try:
        _codec(args.output)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames {args.frames} must be >= 1")
    if (args.height is None) != (args.width is None):
        given, missing = ("--height", "--width") if args.width is None else ("--width", "--height")
        raise UsageError(f"{given} needs {missing} too: give both, or neither for the timeline's size")
    if args.height is not None:
        try:
            latent_size(args.height, args.width)
        except ValueError as e:
            raise UsageError(str(e).replace("height=", "--height ").replace("width=", "--width ")) from None
    if args.seed is not None:
        try:
            check_seed(args.seed)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--seed {args.seed}: {e}") from None


def _device(name: Optional[str]) -> str:
    """The torch device to run on, refused here when it cannot run a model."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data and cannot make a video; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs (cuda:0 ...)")
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise UsageError(f"--device {name}: {device.type} is not available here; use cpu")
    return name


def _generate(args) -> int:
    from .engine.checks import check_memory
    from .engine.config import latent_size
    from .generation import Session, render_size
    from .pipeline import load
    from .timeline.clock import FPS, chunks_for_frames
    from .timeline.conditioning import switch_summary
    from .video import VideoFile, check_writable

    _check_args(args)
    timeline = _read_timeline(args)
    device = _device(args.device)
    check_writable(args.output)  # a read-only folder is found now, not after the whole generation
    if args.model == "tiny":
        print("model: tiny random-weight model (offline, CPU): the video shows noise, not pictures", flush=True)
        pipe = load("tiny", device=device)
    else:
        pipe = load("memflow", local_dir=args.local_dir, device=device, progress=not args.no_progress)
    height, width = render_size(pipe, timeline, args.height, args.width)
    try:
        check_memory(pipe.model, pipe.stream, *latent_size(height, width), 1)  # before any work
    except ValueError as e:
        raise UsageError(str(e)) from None
    chunks = chunks_for_frames(args.frames, pipe.stream.chunk_frames) if args.frames else timeline.num_chunks
    t0 = time.perf_counter()
    # No checkpoints and no frames kept: the video goes to the file, memory stays flat however long.
    session = Session(pipe, checkpoints=None, keep_frames=False, progress=not args.no_progress)
    out = VideoFile(args.output, (height, width), FPS)
    try:
        with out:
            for ch in session.generate(timeline, seed=args.seed, height=height, width=width, num_chunks=chunks):
                out.add(ch.frames)
    except KeyboardInterrupt:
        kept = f"kept the {out.frames_written} frames made so far in {args.output}" if out.frames_written \
            else f"{args.output} left as it was"
        print(f"interrupted: {kept}", file=sys.stderr)
        return 130
    written = out.frames_written
    secs = time.perf_counter() - t0
    print(f"wrote {args.output}: {written} frames ({written / FPS:.1f} s at {FPS} fps), {width}x{height}, "
          f"{chunks} chunks; {switch_summary(timeline, chunks, pipe.stream.chunk_frames)}; "
          f"generated in {secs:.1f} s ({written / secs:.1f} frames/s)")
    return 0


def _one_line(e: BaseException) -> str:
    """An error as one line: what went wrong and, for files, which one."""
    import errno

    if isinstance(e, UsageError):
        text = str(e)
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
        text = f"no space left on the device writing {e.filename or 'the output'}; free some space and run again"
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    elif isinstance(e, RecursionError):
        text = "the input is nested too deeply to read (a broken or hostile file?)"
    else:
        text = f"{type(e).__name__}: {e}"
    return "error: " + " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status (0 done, 2 refused, 130 interrupted, 1 failed).

    Errors are one line on stderr; `--debug` or MEMFLOW_NB_DEBUG=1 shows the full traceback instead.
    """
    import os

    from .weights.errors import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:  # studies: memflow_nb.batch has its own options
        return __import__("memflow_nb.batch", fromlist=["main"]).main(argv[1:])
    debug = "--debug" in argv or os.environ.get("MEMFLOW_NB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args = _parser().parse_args(argv)
        if args.command == "generate":
            return _generate(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UsageError, CheckpointError, OSError, ValueError, TypeError, OverflowError, RecursionError) as e:
        # Bad input, unreadable or corrupt weights (CheckpointError is a ValueError), missing files.
        if debug:
            raise
        print(_one_line(e), file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, with the way to see more
        if debug:
            raise
        print(_one_line(e) + " (run with --debug for the full traceback)", file=sys.stderr)
        return 1
    return 1

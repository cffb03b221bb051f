"""Video files and inline display, through mediapy with the ffmpeg binary that imageio-ffmpeg ships."""
from __future__ import annotations

import errno
import os
import secrets
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .timeline.clock import FPS

_ffmpeg_ready = False


def _media():
    """mediapy, pointed at imageio-ffmpeg's binary (works on Colab and CI without apt)."""
    global _ffmpeg_ready
    import mediapy

    if not _ffmpeg_ready:
        import imageio_ffmpeg

        mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
        _ffmpeg_ready = True
    return mediapy


def _codec(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return "h264"
    if suffix == ".gif":
        return "gif"
    raise ValueError(f"{path}: unsupported video type {suffix!r}; use .mp4 (or .gif for small previews)")


class VideoFile:
    """Write frames as they arrive: `with VideoFile(path, (H, W)) as v: v.add(frames)`.

    frames are uint8 [T, H, W, 3] (or one [H, W, 3] frame). .mp4 is H.264, .gif for previews.
    Nothing is lost: frames go to a hidden file in the same folder, renamed over `path` when the
    block ends normally or by Ctrl-C (KeyboardInterrupt: the frames so far make a valid file). Any
    other error, or a kill, leaves `path` as it was; a full disk raises OSError(ENOSPC).
    """

    def __init__(self, path: Union[str, Path], size: tuple[int, int], fps: float = FPS):
        self.path = Path(path)
        self.codec = _codec(self.path)
        self.size = tuple(int(s) for s in size)
        self.fps = fps
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames_written = 0
        # Same folder, so the final rename is atomic; the writer's own name so two runs never share it.
        self.partial = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(3)}"
                                           f".partial{self.path.suffix.lower()}")
        self._ffmpeg: Optional[subprocess.Popen] = None

    def __enter__(self):
        self._ffmpeg = _start_ffmpeg(self.partial, self.size, self.codec, self.fps)
        return self

    def add(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        for frame in frames if frames.ndim == 4 else frames[None]:
            if frame.shape != (*self.size, 3) or frame.dtype != np.uint8:
                raise ValueError(f"{self.path}: frame {self.frames_written} is {frame.dtype} "
                                 f"{list(frame.shape)}, expected uint8 {[*self.size, 3]}")
            self._write(frame.tobytes())
            self.frames_written += 1

    def _write(self, data: bytes) -> None:
        try:
            self._ffmpeg.stdin.write(data)
        except BrokenPipeError:  # ffmpeg stopped: its message says why (full disk, ...)
            self._ffmpeg.wait()
            raise _ffmpeg_error(self.path, self._ffmpeg) from None

    def __exit__(self, exc_type, exc, tb):
        keep = exc_type is None or issubclass(exc_type, KeyboardInterrupt)
        try:
            finished = self._finish() if keep else self._abandon()
            if finished and self.frames_written:
                os.replace(self.partial, self.path)
        finally:
            self.partial.unlink(missing_ok=True)
        return False

    def _finish(self) -> bool:
        """Close ffmpeg's input so it writes the file's index; raise what went wrong."""
        try:
            self._ffmpeg.stdin.close()
        except BrokenPipeError:
            pass
        self._ffmpeg.wait()
        if self._ffmpeg.returncode != 0:
            raise _ffmpeg_error(self.path, self._ffmpeg)
        return True

    def _abandon(self) -> bool:
        self._ffmpeg.kill()
        self._ffmpeg.wait()
        return False


def _start_ffmpeg(path: Path, size: tuple[int, int], codec: str, fps: float) -> subprocess.Popen:
    """ffmpeg reading raw RGB frames on stdin, in its own session: Ctrl-C in a terminal reaches
    only Python, which then closes the file properly (ffmpeg killed first would leave it broken)."""
    import imageio_ffmpeg

    h, w = size
    if codec == "gif":
        out = ["-vf", "split[s0][s1];[s0]palettegen[p];[s1][p]paletteuse", "-f", "gif"]
    else:  # mediapy's defaults: yuv420p when both sides are even, constant quantizer by size
        fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        out = ["-vcodec", codec, "-pix_fmt", fmt, "-qp", "20" if h * w <= 640 * 480 else "28", "-f", "mp4"]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
           "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "-", "-an", *out, "-y", str(path)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def _ffmpeg_error(path: Path, proc: subprocess.Popen) -> OSError:
    message = " ".join(proc.stderr.read().decode(errors="replace").split())
    if "no space left" in message.lower():
        return OSError(errno.ENOSPC, "no space left on device", str(path))
    return OSError(errno.EIO, f"ffmpeg could not write the video ({message or f'exit {proc.returncode}'})",
                   str(path))


def check_writable(path: Union[str, Path]) -> None:
    """Raise OSError unless a video can be written at `path` (its folder is made if missing).

    Tried with a real file, since permissions alone miss read-only mounts: called before any
    model is loaded, so a bad output path costs nothing.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name such as out.mp4", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.probe")
    try:
        probe.open("wb").close()
    except OSError as e:
        raise type(e)(e.errno, f"cannot write in this folder ({e.strerror})", str(path.parent)) from None
    probe.unlink()


def write_video(path: Union[str, Path], frames: np.ndarray, fps: float = FPS) -> Path:
    """Write uint8 frames [T, H, W, 3] to .mp4 (H.264) or .gif. Returns the path."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    with VideoFile(path, frames.shape[1:3], fps) as v:
        v.add(frames)
    return Path(path)


def read_video(path: Union[str, Path]) -> np.ndarray:
    """Frames of a video file as uint8 [T, H, W, 3].

    Read with imageio-ffmpeg's frame reader: mediapy's reader passes -vsync, which the ffmpeg 9
    that imageio-ffmpeg ships no longer accepts.
    """
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)


def show_video(frames: Union[np.ndarray, Iterable[np.ndarray]], *, fps: float = FPS, title: Optional[str] = None,
               return_html: bool = False, **kw):
    """Show frames inline in a notebook (mediapy's <video> tag); return_html=True gives the HTML string."""
    return _media().show_video(frames, fps=fps, title=title, return_html=return_html, **kw)

"""Video files and inline display, through mediapy with the ffmpeg binary that imageio-ffmpeg ships."""
from __future__ import annotations

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
    """

    def __init__(self, path: Union[str, Path], size: tuple[int, int], fps: float = FPS):
        self.path = Path(path)
        self.codec = _codec(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.frames_written = 0
        self._writer = _media().VideoWriter(self.path, tuple(size), codec=self.codec, fps=fps)

    def __enter__(self):
        self._writer.__enter__()
        return self

    def add(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        for frame in frames if frames.ndim == 4 else frames[None]:
            self._writer.add_image(frame)
            self.frames_written += 1

    def __exit__(self, *exc):
        return self._writer.__exit__(*exc)


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

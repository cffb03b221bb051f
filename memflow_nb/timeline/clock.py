"""Video time: the one place for the frame rate and for which video frames each chunk makes.

MemFlow generates one *chunk* of ``chunk_frames`` latent frames (3) at a time. The decoder turns
latent frame 0 into 1 video frame and every later latent frame into ``LATENT_STRIDE`` (4), so chunk
``k`` makes the video frames ``[max(0, 12k - 3), 12k + 9)``: 9 for chunk 0, 12 for every later one.
Played at ``FPS`` (16) frames per second. A prompt can only change at a chunk start.

Needs nothing but the standard library (the engine and the benchmark import it with torch alone).
"""
from __future__ import annotations

import math

from ..engine.config import StreamConfig

FPS = 16  # video frames per second of Wan2.1 / MemFlow output
CHUNK_FRAMES = StreamConfig.chunk_frames  # latent frames per chunk (3, MemFlow's num_frame_per_block)
LATENT_STRIDE = 4  # video frames per latent frame (the VAE's temporal stride); latent frame 0 makes 1


def frames_of_latents(latent_frames: int) -> int:
    """Video frames made by the first ``latent_frames`` latent frames of a clip (0 -> 0, 1 -> 1, 3 -> 9)."""
    return max(0, LATENT_STRIDE * latent_frames - (LATENT_STRIDE - 1))


def frames_of_chunks(num_chunks: int, chunk_frames: int = CHUNK_FRAMES) -> int:
    """Video frames made by the first ``num_chunks`` chunks (1 -> 9, 2 -> 21, 5 -> 57)."""
    return frames_of_latents(num_chunks * chunk_frames)


def chunk_video_frames(chunk: int, chunk_frames: int = CHUNK_FRAMES) -> tuple[int, int]:
    """Video frames ``[start, stop)`` made by ``chunk`` (0 -> (0, 9), 1 -> (9, 21))."""
    return frames_of_chunks(chunk, chunk_frames), frames_of_chunks(chunk + 1, chunk_frames)


def frames_in_chunk(chunk: int, chunk_frames: int = CHUNK_FRAMES) -> int:
    """How many video frames ``chunk`` makes: 9 for chunk 0, 12 for every later one."""
    start, stop = chunk_video_frames(chunk, chunk_frames)
    return stop - start


def chunks_for_frames(frames: int, chunk_frames: int = CHUNK_FRAMES) -> int:
    """The fewest chunks that make at least ``frames`` video frames (0 for ``frames <= 0``).

    Equally: the first chunk whose first video frame is ``>= frames``.
    """
    if frames <= 0:
        return 0
    return -(-(frames + LATENT_STRIDE - 1) // (LATENT_STRIDE * chunk_frames))  # integer ceil


def time_of_chunk(chunk: int, chunk_frames: int = CHUNK_FRAMES) -> float:
    """Seconds at which ``chunk``'s first video frame is shown."""
    return frames_of_chunks(chunk, chunk_frames) / FPS


def chunk_of_time(seconds: float, chunk_frames: int = CHUNK_FRAMES) -> int:
    """First chunk whose first video frame index is ``>= round(seconds * FPS)`` (half rounds up)."""
    return chunks_for_frames(math.floor(seconds * FPS + 0.5), chunk_frames)


def seconds_of_frames(frames: int) -> float:
    """Playing time of ``frames`` video frames."""
    return frames / FPS

"""Frames on screen: the latest chunk as a PNG preview and the whole video as an inline player."""
from __future__ import annotations

import io

import numpy as np

from ..video import show_video

PREVIEW_MIN_WIDTH = 320  # tiny frames (32x48) are enlarged to at least this many pixels


def png(frame: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes; small frames are enlarged by pixel repetition (crisp, not blurred)."""
    from PIL import Image

    k = max(1, -(-PREVIEW_MIN_WIDTH // frame.shape[1]))
    if k > 1:
        frame = frame.repeat(k, axis=0).repeat(k, axis=1)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def video_html(frames: np.ndarray) -> str:
    """An inline <video> of uint8 frames [T, H, W, 3], at least PREVIEW_MIN_WIDTH pixels wide."""
    return show_video(frames, return_html=True, width=max(frames.shape[2], PREVIEW_MIN_WIDTH))

"""CLIP and DINOv2 feature extractors for study metrics (`pip install 'memflow_nb[eval]'`).

    ev = load_evaluator()                      # openai/clip-vit-base-patch32 + facebook/dinov2-base
    feats = ev.features(frames_uint8, texts)   # then memflow_nb.metrics.feature_metrics(...)

Models come from the Hugging Face hub at pinned revisions (arguments, with defaults below), into
the usual cache; with HF_HUB_OFFLINE=1 only the cache is read, and a missing model is one error
that names the `hf download` command to run. A local folder (`save_pretrained` output) works
as a model id too, without revision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

CLIP_MODEL = "openai/clip-vit-base-patch32"  # VBench's background-consistency model
CLIP_REVISION = "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268"
DINO_MODEL = "facebook/dinov2-base"
DINO_REVISION = "f9e44c814b77203eaa57a6bdbbd535f21ede1415"


class EvalModelNotFound(OSError):
    """A metric model is neither in a local folder nor in the cache (and cannot be downloaded)."""


def _offline() -> bool:
    from .weights.download import _offline as hub_offline

    return hub_offline()


def _pretrained(cls, model_id: str, revision: Optional[str], cache_dir, **kw):
    """`cls.from_pretrained` from a folder, or the hub at `revision` (cache only when offline)."""
    local = Path(model_id).is_dir()
    args = dict(kw) if local else dict(kw, revision=revision, cache_dir=cache_dir, local_files_only=_offline())
    try:
        return cls.from_pretrained(model_id, **args)
    except OSError as e:
        how = f"hf download {model_id}" + (f" --revision {revision}" if revision else "")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if _offline() else f"{type(e).__name__}: {e}"
        raise EvalModelNotFound(f"metric model {model_id}{'@' + revision if revision and not local else ''}: "
                                f"{why}; fetch it once with `{how}` (or pass a local folder)") from None


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("study metrics with CLIP/DINO need transformers: pip install 'memflow_nb[eval]'") from None
    return transformers


def _pooled(out) -> torch.Tensor:
    # transformers 4 returns the projected features as a tensor, 5 as an output's pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass(frozen=True)
class Features:
    """Unit-free features of one run's sampled frames: clip_images [N, d], dino [N, d'] and
    clip_texts [n_texts, d] (float32 numpy)."""

    clip_images: np.ndarray
    clip_texts: np.ndarray
    dino: np.ndarray


@dataclass(frozen=True)
class Evaluator:
    """CLIP (images and text) and DINOv2 (images), on one device, in inference mode."""

    clip: Any
    clip_tokenizer: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    device: torch.device
    batch_size: int = 32
    names: tuple[str, ...] = ()  # "model@revision" of each, for the records

    @torch.inference_mode()
    def _images(self, model_fn, processor, frames: np.ndarray) -> np.ndarray:
        out = []
        for a in range(0, len(frames), self.batch_size):
            batch = processor(images=list(frames[a:a + self.batch_size]), return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, next(self.clip.parameters()).dtype)
            out.append(model_fn(pixels).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def clip_image_features(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [N, H, W, 3] -> CLIP image embeddings [N, d]."""
        return self._images(lambda p: _pooled(self.clip.get_image_features(pixel_values=p)), self.clip_processor, frames)

    def dino_features(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [N, H, W, 3] -> DINOv2 CLS features (after the final layer norm) [N, d]."""
        return self._images(lambda p: self.dino(pixel_values=p).pooler_output, self.dino_processor, frames)

    @torch.inference_mode()
    def clip_text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> CLIP text embeddings [n, d] (each truncated to CLIP's context length)."""
        limit = self.clip.config.text_config.max_position_embeddings
        tok = self.clip_tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.clip.get_text_features(**tok)).float().cpu().numpy()

    def features(self, frames: np.ndarray, texts: Sequence[str]) -> Features:
        return Features(self.clip_image_features(frames), self.clip_text_features(texts), self.dino_features(frames))


def load_evaluator(clip: str = CLIP_MODEL, clip_revision: Optional[str] = CLIP_REVISION, dino: str = DINO_MODEL,
                   dino_revision: Optional[str] = DINO_REVISION, *, device=None, dtype: torch.dtype = torch.float32,
                   cache_dir: Optional[os.PathLike] = None, batch_size: int = 32) -> Evaluator:
    """Load CLIP and DINOv2 for `memflow_nb.metrics.feature_metrics`.

    clip / dino: hub ids (fetched once at the pinned revision into the cache) or local folders.
    device: default "cuda" when available; dtype float32 (both models are small).
    """
    tf = _import_transformers()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    clip_model = _pretrained(tf.CLIPModel, clip, clip_revision, cache_dir).to(device, dtype).eval()
    tokenizer = _pretrained(tf.AutoTokenizer, clip, clip_revision, cache_dir)
    clip_proc = _pretrained(tf.AutoImageProcessor, clip, clip_revision, cache_dir)
    dino_model = _pretrained(tf.AutoModel, dino, dino_revision, cache_dir).to(device, dtype).eval()
    dino_proc = _pretrained(tf.AutoImageProcessor, dino, dino_revision, cache_dir)

    return Evaluator(clip_model, tokenizer, clip_proc, dino_model, dino_proc, device, batch_size,
                     model_names(clip, clip_revision, dino, dino_revision))


def model_names(clip: str = CLIP_MODEL, clip_revision: Optional[str] = CLIP_REVISION, dino: str = DINO_MODEL,
                dino_revision: Optional[str] = DINO_REVISION, **_) -> tuple[str, str]:
    """"id@revision" (or the folder) of the CLIP and DINOv2 models that `load_evaluator` would load."""
    def name(m, r):
        return str(m) if Path(m).is_dir() or not r else f"{m}@{r}"

    return name(clip, clip_revision), name(dino, dino_revision)

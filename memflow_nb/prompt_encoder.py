"""Prompts to embeddings: `encode_prompts` (one batch) and `PromptEncoder` (a per-text cache, with
the encoder resident or streamed). The umT5 model itself is in `memflow_nb.text_encoder`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .tokenizer import Tokenizer


def _encoder_device(encoder) -> torch.device:
    """Where an encoder computes: a module's parameters, or a streamed encoder's `device`."""
    if not isinstance(encoder, nn.Module):
        return torch.device(encoder.device)
    device = next(encoder.parameters()).device
    if device.type == "meta":
        raise RuntimeError("the text encoder is on the meta device: load its weights first "
                           "(UMT5Encoder.from_state_dict or load_state_dict(..., assign=True))")
    return device


def _movable(encoder) -> bool:
    # A streamed encoder's weights stay in its file: there is nothing to move or offload.
    return not getattr(encoder, "streamed", False)


@torch.no_grad()
def encode_prompts(encoder, tokenizer: Tokenizer, prompts: list[str], *,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   trim: bool = False) -> Tensor:
    """Prompt embeddings as MemFlow's DiT consumes them: [B, text_len, dim].

    encoder: a UMT5Encoder, or anything with `.cfg`, `.device`, `(ids, mask) -> hidden` and
    `forward_each` (the streamed encoder of `memflow_nb.weights.text`). It runs where its
    weights are; the result is moved to `device` / cast to `dtype` (defaults: the encoder's).
    Rows at and after each prompt's true length (its `</s>` included) are exactly 0, as in the
    official WanTextEncoder.

    trim=False runs all text_len (512) positions, padding included, as the official code does.
    trim=True runs each prompt only over its own tokens (one sequence per prompt through each
    block) and pads the output with zeros. The real rows do not depend on the padding after
    them (relative positions, masked keys), so the numbers are those of the padded run up to
    float32 rounding: the kernels sum in a different order at another length (measured: at most
    3e-6 of the largest value, tests/test_text_encoder.py). A prompt's embedding then depends on
    that prompt alone, never on which others share its batch.
    """
    ids, mask = tokenizer(prompts)
    run_on = _encoder_device(encoder)
    lengths = mask.sum(1)
    if trim:
        hidden = encoder.forward_each([ids[i:i + 1, :n].to(run_on) for i, n in enumerate(lengths.tolist())])
        out = hidden[0].new_zeros(ids.shape[0], ids.shape[1], hidden[0].shape[-1])
        for i, h in enumerate(hidden):
            out[i, :h.shape[1]] = h[0]
    else:
        out = encoder(ids.to(run_on), mask.to(run_on))
        past_end = torch.arange(ids.shape[1], device=run_on)[None, :] >= lengths.to(run_on)[:, None]  # [B, L]
        # masked_fill, not a multiply: gives +0.0 even where hidden is negative or non-finite.
        out = out.masked_fill(past_end[..., None], 0.0)
    return out.to(device=device or run_on, dtype=dtype or out.dtype)


class PromptEncoder:
    """Encode each distinct prompt once; later calls return the cached embeddings.

    encoder: a UMT5Encoder (resident) or a streamed encoder (`memflow_nb.weights.text`).
    device: where embeddings are returned and kept (default: the encoder's device now).
    dtype: their dtype (default: the encoder's).
    trim: encode each prompt over its own tokens only (see `encode_prompts`; `load` turns it on).
    keep_on_cpu: run a resident encoder where it is (e.g. the CPU) and only move results to
    `device`. Otherwise it is moved to `device` when a new prompt needs encoding; `offload()`
    moves it back to the CPU (the real encoder is 11 GB in bf16).
    """

    def __init__(self, encoder, tokenizer: Tokenizer, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, keep_on_cpu: bool = False, trim: bool = False):
        self.encoder, self.tokenizer, self.trim = encoder, tokenizer, trim
        self.device = torch.device(device) if device is not None else _encoder_device(encoder)
        self.dtype = dtype
        self.keep_on_cpu = keep_on_cpu
        self._cache: dict[str, Tensor] = {}  # prompt -> [text_len, dim] on self.device

    def __call__(self, prompts: str | list[str]) -> Tensor:
        """prompts (B strings) -> [B, text_len, dim] on `device`; only unseen prompts are encoded,
        all of them in one batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))  # distinct, in order
        if new:
            if not self.keep_on_cpu and _movable(self.encoder) and _encoder_device(self.encoder) != self.device:
                self.encoder.to(self.device)
            emb = encode_prompts(self.encoder, self.tokenizer, new, device=self.device, dtype=self.dtype,
                                 trim=self.trim)
            self._cache.update(zip(new, emb))
        # stack copies, so editing the result cannot corrupt the cache
        return torch.stack([self._cache[p] for p in prompts])

    def encode_all(self, texts: list[str]) -> Tensor:
        """Encode every text of a timeline now, in one batch: [len(texts), text_len, dim].

        Call it before generating, so that a streamed encoder reads its file once for all
        prompts rather than once per prompt switch; later lookups come from the cache.
        """
        return self(list(texts))

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Forget every cached embedding."""
        self._cache.clear()

    def offload(self) -> None:
        """Move the encoder to the CPU and release the GPU memory it held; the cache stays.
        (A streamed encoder holds nothing between calls; this only releases the cache.)"""
        was_cuda = _encoder_device(self.encoder).type == "cuda"
        if _movable(self.encoder):
            self.encoder.to("cpu")
        if was_cuda:
            torch.cuda.empty_cache()

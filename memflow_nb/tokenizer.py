"""umT5's tokenizer (from Wan's `google/umt5-xxl/tokenizer.json`) and Wan's prompt cleaning."""
from __future__ import annotations

import html
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .engine.config import ModelConfig

__all__ = ["clean_text", "Tokenizer"]


def clean_text(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake, undo (double) HTML escaping, collapse whitespace."""
    import ftfy  # imported here so the encoder itself needs only torch

    text = ftfy.fix_text(text)
    # Twice, because scraped captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


class Tokenizer:
    """umT5 tokenizer from a folder holding `tokenizer.json` (e.g. Wan's `google/umt5-xxl`).

    Mirrors `AutoTokenizer(..., padding="max_length", truncation=True, max_length=text_len,
    add_special_tokens=True)`: each prompt ends in `</s>`, long prompts lose their tail (the
    `</s>` is kept), and rows are right-padded with `<pad>`.
    """

    eos_token = "</s>"
    pad_token = "<pad>"

    def __init__(self, path: str | Path, text_len: int = ModelConfig.text_len, *, clean: bool = True):
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer folder {file.parent} has no {file.name}"
                                    + ("" if file.parent.is_dir() else " (the folder does not exist)"))
        import tokenizers

        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception ("EOF while parsing ...")
            raise ValueError(f"{file} is not a tokenizer.json that the tokenizers library can read "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); download "
                             "google/umt5-xxl/tokenizer.json again (README, section 'Weights')") from None
        # We truncate and pad ourselves, so that truncation can be counted and reported.
        tok.no_truncation()
        tok.no_padding()
        self._tok, self.text_len, self.clean = tok, int(text_len), clean
        self.eos_id, self.pad_id = (self._token_id(t) for t in (self.eos_token, self.pad_token))

        # Does the post-processor already append </s>? (The HF umT5 tokenizer.json does, with a
        # TemplateProcessing "$A </s>"; a bare tokenizer does not.) Then never add it twice.
        proc = tok.post_processor
        probe = tok.encode("", add_special_tokens=False)
        processed = tok.post_process(probe).ids if proc is not None else []
        self._eos_from_processor = processed[-1:] == [self.eos_id]
        self._num_special = (len(processed) if proc is not None else 0) + (not self._eos_from_processor)
        if self._num_special >= self.text_len:
            raise ValueError(f"text_len={self.text_len} leaves no room for text after {self._num_special} special tokens")

    def _token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token!r} token")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def count(self, prompts: str | list[str]) -> list[int]:
        """Tokens each prompt has before truncation, special tokens (`</s>`) included: the
        encoder reads at most `text_len` of them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_text(p) if self.clean else p for p in prompts]
        return [len(e.ids) + self._num_special for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """prompts (B strings) -> (ids int64 [B, text_len], mask int64 [B, text_len]).

        mask is 1 on real tokens (the `</s>` included) and 0 on padding. Warns when a prompt is
        truncated, naming how many tokens were dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_text(p) if self.clean else p for p in prompts]
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.int64)
        room = self.text_len - self._num_special  # content tokens that fit
        for i, enc in enumerate(encodings):
            dropped = len(enc.ids) - room
            if dropped > 0:
                warnings.warn(f"prompt {i} has {len(enc.ids) + self._num_special} tokens, more than "
                              f"text_len={self.text_len}: its last {dropped} tokens were dropped "
                              f"({prompts[i][:40]!r}...)", stacklevel=2)
                enc.truncate(room)
            row = self._tok.post_process(enc).ids if self._tok.post_processor is not None else enc.ids
            if not self._eos_from_processor:
                row = row + [self.eos_id]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, :len(row)] = 1
        return ids, mask

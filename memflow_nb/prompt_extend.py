"""Optional: draft a long MemFlow prompt from a short idea with a small local instruction-tuned
language model, through ``transformers`` (``pip install "memflow_nb[prompt]"``).

The model is asked to follow MemFlow's prompting advice (``ADVICE``); its answer is cleaned to one
paragraph and cut at a word end to fit the text encoder's 512 tokens. It is a draft: read it, and
keep the subject's description word for word the same as in the other segments.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .engine.config import ModelConfig
from .prompt_text import CountsTokens, truncate_to_tokens

# A 0.5B instruction-tuned model: about 1 GB of float32 weights, a few seconds per prompt on a CPU.
DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # config, weights, tokenizer

ADVICE = """You write prompts for MemFlow, a text-to-video model. It reads each prompt on its own, \
so every prompt must say everything. Rewrite the user's idea as one detailed video prompt:
- Open with the subject, named and described concretely (age, looks, clothes, colours). Never open with a pronoun.
- Say where it happens: the place, the time of day, the weather and the light.
- Describe the motion, the camera (shot size and movement) and the visual style.
- Keep every detail the user gives. If a previous prompt is given, copy its description of the subject \
and the place word for word and change only what happens.
- One paragraph of plain prose in the present tense, 80 to 120 words. No list, no title, no quotation marks.
Answer with the prompt only."""


def build_messages(text: str, previous: Optional[str] = None) -> list[dict[str, str]]:
    """The chat sent to the model: ``ADVICE`` as the system message, then the idea (and the
    previous segment's prompt, whose descriptions are to be kept)."""
    if not text.strip():
        raise ValueError("extend_prompt: text is empty; give a short idea to extend")
    user = f"Idea: {text.strip()}"
    if previous:
        user = f"Previous prompt: {previous.strip()}\n\n{user}"
    return [{"role": "system", "content": ADVICE}, {"role": "user", "content": user}]


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """``messages`` as the model's input text: its chat template when the tokenizer has one,
    else plain "System: ... User: ... Assistant:" lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def clean_reply(reply: str) -> str:
    """One paragraph: whitespace collapsed, a leading "Prompt:" label and wrapping quotes removed."""
    text = " ".join(reply.split())
    text = re.sub(r"^(?:\*\*)?(?:video )?prompt(?:\*\*)?\s*:\s*", "", text, flags=re.IGNORECASE)
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”":
        text = text[1:-1].strip()
    return text


@dataclass(frozen=True)
class PromptExtender:
    """A loaded language model and its tokenizer (``transformers`` objects) and where they came from."""

    model: Any
    tokenizer: Any
    source: str


def _offline() -> bool:
    import huggingface_hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or huggingface_hub.is_offline_mode()


def _folder(model: str, revision: Optional[str], cache_dir: Optional[str]) -> Path:
    """A local folder as is; a hub id through the huggingface_hub cache (no network when offline)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _offline()
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, allow_patterns=_FILES,
                                      local_files_only=offline))
    except LocalEntryNotFoundError as e:
        get = f"hf download {model}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"prompt model {model!r} is not in the Hugging Face cache"
            + (" and HF_HUB_OFFLINE is set" if offline else "")
            + f"; download it once with `{get}` (about 1 GB for the default), or pass model= a local folder") from e


@functools.lru_cache(maxsize=1)  # the last model stays loaded; load_extender.cache_clear() frees it
def load_extender(model: str = DEFAULT_MODEL, revision: Optional[str] = None, *,
                  device: str = "cpu", cache_dir: Optional[str] = None) -> PromptExtender:
    """Load a causal language model and its tokenizer in float32 on ``device``.

    model: a hub id (fetched into the Hugging Face cache on first use, from the cache alone when
    HF_HUB_OFFLINE is set) or a local folder saved with ``save_pretrained``.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError("prompt extension needs transformers: pip install \"memflow_nb[prompt]\"") from e
    folder = _folder(model, revision, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return PromptExtender(lm, tokenizer, f"{model}@{revision or 'main'}" if not Path(model).is_dir() else str(folder))


def extend_prompt(text: str, *, previous: Optional[str] = None, model: str = DEFAULT_MODEL,
                  revision: Optional[str] = None, max_new_tokens: int = 256,
                  extender: Optional[PromptExtender] = None, tokenizer: Optional[CountsTokens] = None,
                  token_limit: int = ModelConfig.text_len, device: str = "cpu") -> str:
    """A longer prompt written from ``text`` by a small language model (greedy decoding, so the
    same input gives the same draft).

    previous: the previous segment's prompt, whose subject and place descriptions are to be kept.
    model, revision: which model (see ``load_extender``); ``extender``: one already loaded.
    max_new_tokens: the language model's output budget.
    tokenizer, token_limit: the reply is cut at a word end to at most ``token_limit`` umT5 tokens,
        counted with ``tokenizer`` (``pipe.text.tokenizer``) or else approximately
        (``memflow_nb.prompt_text.approx_tokens``).
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ext = extender or load_extender(model, revision, device=device)
    tok, lm = ext.tokenizer, ext.model
    inputs = tok(render_prompt(tok, build_messages(text, previous)), return_tensors="pt", add_special_tokens=False)
    inputs = {k: v.to(lm.device) for k, v in inputs.items()}
    config = lm.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                          top_k=None, eos_token_id=eos, pad_token_id=pad)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return truncate_to_tokens(clean_reply(reply), token_limit, tokenizer)

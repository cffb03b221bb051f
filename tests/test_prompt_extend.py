"""Tests for memflow_nb.prompt_extend on a tiny random language model of Qwen2's architecture, made
here (a byte-level BPE tokenizer trained in memory, random weights): nothing is downloaded."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from memflow_nb.prompt_extend import (ADVICE, DEFAULT_MODEL, build_messages, clean_reply, extend_prompt,
                                      load_extender, render_prompt)
from memflow_nb.prompt_text import approx_tokens
from memflow_nb.text_encoder import Tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEA = "a lighthouse keeper climbs the stairs"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A folder with a random 2-layer Qwen2 causal LM and a 400-token byte-level BPE tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([ADVICE, IDEA], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    # A wide initialisation, so the random model writes varied text instead of stopping at once.
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=0, tie_word_embeddings=True,
                      initializer_range=0.5)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    yield folder
    load_extender.cache_clear()


@pytest.fixture(scope="module")
def umt5_bytes() -> Tokenizer:
    """The tiny pipeline's byte-level umT5 stand-in: one token per UTF-8 byte, plus </s>."""
    from memflow_nb.pipeline import tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tiny_tokenizer().save(str(Path(tmp) / "tokenizer.json"))
        return Tokenizer(tmp)


def test_the_template_carries_memflows_advice(tiny_lm):
    messages = build_messages(IDEA, previous="A keeper in a navy coat walks along the pier.")
    assert [m["role"] for m in messages] == ["system", "user"]
    for advice in ("Never open with a pronoun", "word for word", "the place, the time of day", "camera",
                   "80 to 120 words"):
        assert advice in messages[0]["content"]
    assert messages[1]["content"] == f"Previous prompt: A keeper in a navy coat walks along the pier.\n\nIdea: {IDEA}"
    tok = load_extender(str(tiny_lm)).tokenizer
    text = render_prompt(tok, messages)
    assert text.startswith("<|im_start|>system\nYou write prompts for MemFlow")
    assert text.endswith("<|im_start|>assistant\n")
    tok_plain = type("NoTemplate", (), {"chat_template": None})()
    assert render_prompt(tok_plain, build_messages(IDEA)).endswith(f"User: Idea: {IDEA}\n\nAssistant:")
    with pytest.raises(ValueError, match="empty"):
        build_messages("  ")


def test_extend_prompt_is_the_models_greedy_reply(tiny_lm):
    ext = load_extender(str(tiny_lm))
    assert load_extender(str(tiny_lm)) is ext  # loaded once
    out = extend_prompt(IDEA, model=str(tiny_lm), max_new_tokens=40)
    assert isinstance(out, str) and out and out == extend_prompt(IDEA, extender=ext, max_new_tokens=40)
    # The same by hand: template, greedy generation, only the new tokens decoded, cleaned.
    ids = ext.tokenizer(render_prompt(ext.tokenizer, build_messages(IDEA)), return_tensors="pt",
                        add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = ext.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                                 pad_token_id=0)
    assert gen.shape[1] - ids.shape[1] <= 40
    assert out == clean_reply(ext.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    assert extend_prompt(IDEA, extender=ext, max_new_tokens=80) != out  # the budget is passed on
    with pytest.raises(ValueError, match="max_new_tokens"):
        extend_prompt(IDEA, extender=ext, max_new_tokens=0)


def test_the_reply_is_cut_to_the_encoder_limit(tiny_lm, umt5_bytes):
    ext = load_extender(str(tiny_lm))
    full = extend_prompt(IDEA, extender=ext, max_new_tokens=60, token_limit=10**6)
    assert umt5_bytes.count(full)[0] > 20
    cut = extend_prompt(IDEA, extender=ext, max_new_tokens=60, token_limit=20, tokenizer=umt5_bytes)
    assert full.startswith(cut) and umt5_bytes.count(cut)[0] <= 20
    approx = extend_prompt(IDEA, extender=ext, max_new_tokens=60, token_limit=8)  # no tokenizer: approximate
    assert full.startswith(approx) and approx_tokens(approx) <= 8


def test_clean_reply():
    assert clean_reply('  Prompt:  "A keeper\n\nclimbs the  stairs."  ') == "A keeper climbs the stairs."
    assert clean_reply("**Video prompt**: A boat.") == "A boat."


def test_a_missing_model_offline_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'memflow-nb-test/no-such-model'.*hf download memflow-nb-test/"):
        load_extender("memflow-nb-test/no-such-model", cache_dir=str(tmp_path))
    assert DEFAULT_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"

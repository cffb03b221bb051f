"""Fixtures shared by the test modules (helpers live here; no test module imports another)."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture
def make_tiny_model():
    """make_tiny_model(seed=0, **config_overrides): a random-weight tiny DiT (recipe weights),
    eval mode, float32, CPU."""
    import dataclasses

    from memflow_nb.config import ModelConfig
    from memflow_nb.model import CausalWanModel
    from memflow_nb.weights import random_module

    def make(seed: int = 0, **overrides):
        cfg = dataclasses.replace(ModelConfig.from_name("tiny"), **overrides)
        return random_module(lambda: CausalWanModel(cfg), seed)
    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture
def tiny_vae():
    """A narrow random-weight Wan VAE decoder (same architecture, width 8), float32, CPU."""
    from memflow_nb.decode import VAEConfig, WanVAEDecoder
    from memflow_nb.weights import random_module

    return random_module(lambda: WanVAEDecoder(VAEConfig(dim=8)), 0)


@pytest.fixture
def tiny_prompt():
    """tiny_prompt(seed, text_dim=32, length=7): prompt embeddings [1, 512, text_dim], zero past `length`."""
    def make(seed: int, text_dim: int = 32, length: int = 7) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        pe = torch.randn(1, 512, text_dim, generator=g)
        pe[:, length:] = 0
        return pe
    return make


@pytest.fixture
def stream_states(tiny_prompt):
    """stream_states(model, n_chunks, stream, hw, seed, prompt_seed) -> ([state 0..n], [x0 1..n])."""
    from memflow_nb.config import StreamConfig
    from memflow_nb.stream import init_state, step

    def run(model, n_chunks, stream=StreamConfig(), hw=(64, 64), seed=3, prompt_seed=0):
        state = init_state(model, stream, tiny_prompt(prompt_seed, model.cfg.text_dim), height=hw[0], width=hw[1],
                           seed=seed)
        states, outs = [state], []
        for _ in range(n_chunks):
            state, x0 = step(model, state)
            states.append(state)
            outs.append(x0)
        return states, outs
    return run


@pytest.fixture
def no_network(monkeypatch):
    """Any hub download fails the test."""
    def refuse(*a, **k):
        raise AssertionError("no download may happen here")
    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)

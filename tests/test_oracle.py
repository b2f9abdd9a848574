"""The float32 engine on the default model (SmolLM2-135M-Instruct) reproduces an independently computed greedy
continuation token for token."""
import json
from pathlib import Path

import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig

ORACLE = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())


@pytest.mark.slow
def test_default_model_reproduces_the_oracle(default_model):
    assert default_model.dtype == "float32" and default_model.resolved.kind == "gguf"
    tokenizer = default_model.tokenizer
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": ORACLE["prompt"]}])
    assert prompt_ids == ORACLE["prompt_ids"]

    generator = Generator(default_model.model, tokenizer.eos_token_ids)
    result = generator.generate(prompt_ids, GenerationConfig(max_new_tokens=256))
    assert result.generated_ids == ORACLE["greedy_new_ids"]
    assert len(result.generated_ids) == 126 and result.generated_ids[-1] == ORACLE["eos_token_id"]
    assert result.finish_reason == "stop"
    assert tokenizer.decode(result.generated_ids) == ORACLE["greedy_text"]


@pytest.mark.slow
def test_float32_weights_reproduce_the_oracle_too(default_model):
    """--weights float32 (dequantized on load) multiplies the same values as the packed default: same tokens."""
    from exo_tinygrad_medusa.model.loader import load_model
    assert default_model.weights == "compact"
    dense = load_model("smollm2-135m", dtype="float32", weights="float32")
    assert dense.weights == "float32"
    prompt_ids = dense.tokenizer.encode_chat([{"role": "user", "content": ORACLE["prompt"]}])
    result = Generator(dense.model, dense.tokenizer.eos_token_ids).generate(prompt_ids, GenerationConfig(max_new_tokens=256))
    assert result.generated_ids == ORACLE["greedy_new_ids"]


def test_compact_weights_need_packed_or_16_bit_weights_in_float32(tiny_checkpoint):
    from exo_tinygrad_medusa.model.loader import load_model
    with pytest.raises(ValueError, match="stores no bfloat16 or float16 matrices"):
        load_model(str(tiny_checkpoint()), weights="compact")
    with pytest.raises(ValueError, match="--weights compact needs --dtype float32"):
        load_model(str(tiny_checkpoint(dtype=np.float16)), weights="compact", dtype="float16")
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        load_model(str(tiny_checkpoint()), weights="int4")

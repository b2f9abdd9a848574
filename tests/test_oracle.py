"""The float32 engine on the default model (SmolLM2-135M-Instruct) reproduces an independently computed greedy
continuation token for token."""
import json
from pathlib import Path

import pytest

from exo_tinygrad_medusa.generate import Generator
from exo_tinygrad_medusa.sampling import GenerationConfig

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

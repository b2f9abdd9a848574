"""Write a tiny, valid byte-level BPE tokenizer directory (for tests that need an HF checkpoint dir)."""
import itertools
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b has id BYTE_OFFSET + b
MIN_VOCAB_SIZE = BYTE_OFFSET + 256
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                   " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value, indexed by byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_tokenizer(directory, vocab_size: int = 300) -> Path:
    """Write tokenizer.json + tokenizer_config.json whose vocab (incl. added tokens) is exactly `vocab_size`."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MIN_VOCAB_SIZE + 256 * 256:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MIN_VOCAB_SIZE + 256 * 256}], got {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: BYTE_OFFSET + b for b, c in enumerate(byte_chars)})
    # merge the most common English characters first so short words actually get merged
    common = list("Ġetaoinshrdlucmfwypvbgkjqxz")
    order = common + [c for c in byte_chars if c not in common]
    merges = list(itertools.islice(itertools.product(order, order), vocab_size - MIN_VOCAB_SIZE))
    vocab.update({a + b: MIN_VOCAB_SIZE + i for i, (a, b) in enumerate(merges)})
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 2048,
              "chat_template": CHATML_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory

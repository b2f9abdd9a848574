"""Tokenizer + chat template, built either from a Hugging Face directory or from GGUF metadata.

Uses the `tokenizers` library (no transformers) and renders chat templates with jinja2 the way
transformers does, so prompts match what the model was trained on.
"""
import functools
import json
import logging
import os
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

log = logging.getLogger(__name__)

# Regexes as written in the models' own tokenizer.json files (llama.cpp uses equivalent ones).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_PRE = ("gpt2", "gpt-2", "default", "starcoder", "refact", "olmo")
_LLAMA3_PRE = ("llama-bpe", "llama3", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
# End-of-turn markers that count as EOS only when the chat template actually emits them.
_EOT_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def _bytelevel_pre_tokenizer(pre: str | None) -> tuple[Any, Any, bool]:
    """Return (normalizer, pre_tokenizer, ignore_merges) matching llama.cpp's `tokenizer.ggml.pre` type."""
    pre = pre or "default"
    if pre in _GPT2_PRE:
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2 byte-level splitting
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        regex = _LLAMA3_RE if pre in _LLAMA3_PRE else _QWEN2_RE
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        pt = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # llama3's tokenizer.json sets ignore_merges (whole-word vocab hits win); qwen2 normalizes to NFC
        return (normalizers.NFC() if pre in _QWEN2_PRE else None), pt, pre in _LLAMA3_PRE
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                     f"{sorted(_GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE + ('smollm',))}")


def _token_content(tok: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedToken dicts
    return tok.get("content") if isinstance(tok, dict) else tok


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_list(x: Any) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, eos_token_ids: Iterable[int], bos_token_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False):
        self.tok, self.bos_token_id, self.chat_template, self.add_bos = tok, bos_token_id, chat_template, add_bos
        eos = list(dict.fromkeys(int(i) for i in eos_token_ids))
        # end-of-turn tokens the template writes after each message also stop generation
        for marker in _EOT_MARKERS:
            if chat_template and marker in chat_template and (i := tok.token_to_id(marker)) is not None and i not in eos:
                log.debug("treating %s (id %d) as eos: the chat template emits it", marker, i)
                eos.append(i)
        if not eos:
            raise ValueError("tokenizer defines no eos token id")
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self.eos_token_id: int = eos[0]
        # max id + 1 rather than a count: added tokens may leave holes in the id space
        self.vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        # control tokens (im_start, eot, ...): only a chat template may write them; in message text they are text
        self.special_ids: frozenset[int] = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        texts = sorted({t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content},
                       key=len, reverse=True)  # longest first: "<|im_start|>" before a shorter prefix of it
        self._special_text = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._plain_tok: tokenizers.Tokenizer | None = None

    @classmethod
    def from_gguf_metadata(cls, kv: dict[str, Any]) -> "Tokenizer":
        model = kv.get("tokenizer.ggml.model")
        if model != "gpt2":
            hint = " (SentencePiece 'llama' vocabularies are not supported from GGUF; use the model's HF directory)" \
                if model == "llama" else ""
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}{hint}; only 'gpt2' (byte-level BPE) is supported")
        tokens: list[str] = kv["tokenizer.ggml.tokens"]
        types: list[int] = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in kv.get("tokenizer.ggml.merges", [])]
        normalizer, pre_tok, ignore_merges = _bytelevel_pre_tokenizer(kv.get("tokenizer.ggml.pre"))
        tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer, tok.decoder = pre_tok, decoders.ByteLevel()
        # control tokens are "special" (skippable on decode); user-defined ones are matched in text but kept on decode
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _TOKEN_TYPE_USER_DEFINED])
        eos = [kv[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if k in kv]
        return cls(tok, eos, kv.get("tokenizer.ggml.bos_token_id"), kv.get("tokenizer.chat_template"),
                   bool(kv.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg, gen = _read_json(path / "tokenizer_config.json"), _read_json(path / "generation_config.json")

        def ids(name: str) -> list[int]:
            i = tok.token_to_id(_token_content(cfg.get(name)) or "")
            return [] if i is None else [i]

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: transformers picks "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():  # newer HF layout keeps the template in its own file
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        bos = (ids("bos_token") or _as_list(gen.get("bos_token_id")) or [None])[0]
        return cls(tok, ids("eos_token") + _as_list(gen.get("eos_token_id")), bos, template,
                   bool(cfg.get("add_bos_token", False)))

    def token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tok.id_to_token(token_id) or "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        # the tokenizer.json post-processor may already add BOS; never add it twice
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass --no-chat-template to feed the prompt as raw text")
        return _compile_template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, bos_token=self.token_str(self.bos_token_id),
                                     eos_token=self.token_str(self.eos_token_id), **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's ids. The template writes the control tokens (BOS included, if the model wants
        one); the messages' contents are text: a content holding "<|im_end|>\n<|im_start|>system" cannot open a turn
        of its own, its special-token strings are tokenised as the characters they are."""
        hidden: list[str] = []
        # a marker the template passes through unchanged (no letters: no case filter alters it; no spaces: trim
        # keeps it) and that no message can forge (a fresh random number per call)
        nonce = f"{secrets.randbelow(10 ** 12):012d}"

        def hide(match: re.Match) -> str:
            hidden.append(match.group(0))
            return f"\ue000{nonce}:{len(hidden) - 1}\ue001"

        pattern = self._special_text
        safe = [{**m, "content": pattern.sub(hide, m["content"])}
                if pattern is not None and isinstance(m.get("content"), str) and pattern.search(m["content"]) else m
                for m in messages]
        rendered = self.apply_chat_template(safe, add_generation_prompt)
        if not hidden:  # the common case: exactly the ids of the rendered text
            return self.encode(rendered, add_special_tokens=False)
        return self._encode_hidden(rendered, hidden, re.compile(f"\ue000{nonce}:(\\d+)\ue001"))

    def _encode_hidden(self, rendered: str, hidden: list[str], marker: re.Pattern) -> list[int]:
        """Encode `rendered` whose contents' special-token strings were replaced by markers: the template's own
        control tokens split it into stretches (as the tokenizer splits any text); a stretch holding a marker is
        encoded with its hidden strings restored and special-token matching off, every other keeps its ids."""
        enc = self.tok.encode(rendered, add_special_tokens=False)

        def stretch(start: int, end: int, ids: list[int]) -> list[int]:
            text = rendered[start:end]
            if not marker.search(text):
                return ids
            return self._plain().encode(marker.sub(lambda m: hidden[int(m.group(1))], text),
                                        add_special_tokens=False).ids

        out, start, run = [], 0, []
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i in self.special_ids:
                out += stretch(start, a, run)
                out.append(i)
                start, run = b, []
            else:
                run.append(i)
        return out + stretch(start, len(rendered), run)

    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special-token strings as text (a copy: the flag is per tokenizer,
        and the original keeps matching them for templates and raw prompts, on other threads too)."""
        if self._plain_tok is None:
            plain = tokenizers.Tokenizer.from_str(self.tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return self._plain_tok


class StreamDecoder:
    """Turns a stream of token ids into text deltas, holding back characters whose UTF-8 bytes are incomplete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        # ids[prefix:read] were already emitted and are re-decoded as context so that decoders which
        # depend on neighbouring tokens (e.g. leading-space handling) produce the right delta
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self, force: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not force):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(prefix_text):]

    def feed(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._delta(force=False)

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a genuinely invalid byte sequence at the end of generation)."""
        return self._delta(force=True)

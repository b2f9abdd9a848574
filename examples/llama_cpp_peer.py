"""Peer numbers: llama.cpp greedy on the same GGUF and MT-bench first turns as `exo-medusa bench --limit 4
--max-generate-tokens 64`. Needs `llama-cpp-python` in a separate venv (never in this project's)."""
import json, sys, time
from llama_cpp import Llama
gguf = sys.argv[1]
prompts = [json.loads(l)["turns"][0] for l in open(sys.argv[2] if len(sys.argv) > 2 else "../shared/data/mt_bench.jsonl")][:4]
rows = []
for threads in (2, 1):
    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=threads, verbose=False, seed=0)
    llm.create_chat_completion([{"role": "user", "content": prompts[0]}], max_tokens=8, temperature=0.0, top_k=1)  # warm-up
    for p in prompts:
        # decode rate as exo-medusa bench measures it: tokens after the first, over the time after the first
        times = []
        for chunk in llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=64, temperature=0.0,
                                                top_k=1, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
        n, dt = len(times) - 1, times[-1] - times[0]
        rows.append({"threads": threads, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1)})
        print(json.dumps(rows[-1]), flush=True)
for threads in (2, 1):
    r = [x for x in rows if x["threads"] == threads]
    print(json.dumps({"threads": threads, "tokens_per_s_mean": round(sum(x["tokens"] for x in r) / sum(x["seconds"] for x in r), 1)}))

"""Peer numbers: llama.cpp greedy on the same GGUF and MT-bench first turns as `exo-medusa bench --limit 4
--max-generate-tokens 64`. Needs `llama-cpp-python` in a separate venv (never in this project's).
--count tokens times the token ids llama.cpp's generator yields instead of the streamed text: a random-weight model
(examples/big_gguf.py) picks tokens that print nothing (padding, control tokens, pieces of a UTF-8 character) and can
pick end-of-text at any step, and the text count would miss or stop at those; its prompt is the file's chat template
rendered with jinja2, as the chat call renders it.
usage: python llama_cpp_peer.py GGUF [PROMPTS.jsonl] [--threads 2,1] [--limit 4] [--max-tokens 64] [--count tokens]"""
import argparse, json, time
from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("gguf")
p.add_argument("prompts", nargs="?", default="../shared/data/mt_bench.jsonl")
p.add_argument("--threads", default="2,1", help="comma-separated thread counts, each timed in turn")
p.add_argument("--limit", type=int, default=4)
p.add_argument("--max-tokens", type=int, default=64)
p.add_argument("--count", choices=("text", "tokens"), default="text")
args = p.parse_args()


def text_times(llm, prompt, max_tokens):
    """When each streamed chunk of text arrived."""
    times = []
    for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                            temperature=0.0, top_k=1, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return times


def token_times(llm, prompt, max_tokens):
    """When each greedy token id arrived, whatever its text, end-of-text included."""
    import jinja2
    text = jinja2.Template(llm.metadata["tokenizer.chat_template"]).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    times = []
    for _ in llm.generate(llm.tokenize(text.encode(), add_bos=False, special=True), top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == max_tokens:
            break
    return times


arrivals = token_times if args.count == "tokens" else text_times
prompts = [json.loads(line)["turns"][0] for line in open(args.prompts)][:args.limit]
thread_counts = [int(t) for t in args.threads.split(",")]
rows = []
for threads in thread_counts:
    llm = Llama(model_path=args.gguf, n_ctx=1024, n_threads=threads, verbose=False, seed=0)
    arrivals(llm, prompts[0], 8)  # warm-up
    for prompt in prompts:
        # decode rate as exo-medusa bench measures it: tokens after the first, over the time after the first
        times = arrivals(llm, prompt, args.max_tokens)
        n, dt = len(times) - 1, times[-1] - times[0]
        rows.append({"threads": threads, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt, 1)})
        print(json.dumps(rows[-1]), flush=True)
for threads in thread_counts:
    r = [x for x in rows if x["threads"] == threads]
    print(json.dumps({"threads": threads, "tokens_per_s_mean": round(sum(x["tokens"] for x in r) / sum(x["seconds"] for x in r), 1)}))

"""Write the synthetic high-acceptance model of examples/bench-ring-tiny-echo.*: a tiny random Llama with tied
embeddings (it keeps repeating itself) and near-identity random Medusa heads, so a verify step accepts ~4 tokens.
It says nothing about text quality; it shows what the ring does with heads that accept.

    python examples/ring_echo_model.py OUT_DIR
    exo-medusa bench-ring OUT_DIR/model --medusa-heads OUT_DIR/heads --medusa-choices cpu-8 \
        --link-delays-ms 0,2,5,20,50 --max-generate-tokens 40 --prompts OUT_DIR/prompts.jsonl
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers_models import write_tiny_checkpoint  # noqa: E402

from exo_tinygrad_medusa.model.loader import load_model  # noqa: E402
from exo_tinygrad_medusa.decoding.heads import random_heads  # noqa: E402

out = Path(sys.argv[1])
model = write_tiny_checkpoint(out / "model", "llama", tie=True)
loaded = load_model(str(model), dtype="float32")
random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0, scale=0.15).save(out / "heads")
(out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in (
    {"prompt": "hello there, how are you?", "id": "hello"}, {"prompt": "Tell me about the sea.", "id": "sea"})))
print(out)

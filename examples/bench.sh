#!/usr/bin/env bash
# Plain vs Medusa greedy on the default model, then a tree tuned to this machine.
# Usage: examples/bench.sh [HEADS_DIR] [extra `exo-medusa bench` flags...]
#   without HEADS_DIR the heads are random: a speed-only run (acceptance says nothing about trained heads)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"

if [[ $# -gt 0 && -d "$1" ]]; then
  HEADS=$1; shift
  # tune the tree first: bench then picks up $HEADS/tree-<device>.json like run and serve do
  "$PY" -m exo_tinygrad_medusa tune-tree --medusa-heads "$HEADS" --limit 8 --max-generate-tokens 96
  HEAD_FLAGS=(--medusa-heads "$HEADS")
else
  HEAD_FLAGS=(--random-heads)
fi

PLOT=()
"$PY" -c "import matplotlib" 2>/dev/null && PLOT=(--plot "$OUT/bench.png")
"$PY" -m exo_tinygrad_medusa bench "${HEAD_FLAGS[@]}" --limit "${LIMIT:-8}" --max-generate-tokens "${TOKENS:-128}" \
  --json "$OUT/bench.json" "${PLOT[@]}" "$@" | tee "$OUT/bench.md"

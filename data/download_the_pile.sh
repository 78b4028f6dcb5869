#!/usr/bin/env bash
# Download The Pile and shard it:  bash data/download_the_pile.sh [OUT_DIR]
#   OUT_DIR (default corpus/pile) gets raw/NN.jsonl.zst (the downloads) and shards/part-pile-*.jsonl.zst.
#   PILE_BASE_URL  mirror folder holding NN.jsonl.zst (default: the Hugging Face pile-uncopyrighted mirror)
#   PILE_PARTS     parts to fetch, e.g. "00 01" (default: 00 .. 29)
#   SHARD_WORKERS  sharder processes (default: number of CPUs)
# Interrupted? Run the same command again: downloads resume (HTTP Range) and sharding continues.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
# Paths given by the user are relative to where they ran the script; the commands run from the repository.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
OUT_DIR="$(abspath "${1:-corpus/pile}")"
case "${PILE_BASE_URL:-}" in ""|*://*) ;; *) export PILE_BASE_URL="$(abspath "$PILE_BASE_URL")" ;; esac
cd "$(dirname "$0")/.."
# The repository's .venv when there is one (looked up after the cd, so it is found from anywhere).
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WORKERS="${SHARD_WORKERS:-$(nproc 2>/dev/null || echo 1)}"

"$PYTHON" data/download.py pile --output_dir "$OUT_DIR/raw"
"$PYTHON" data/shard.py "$OUT_DIR/raw" --format pile --source pile \
    --output_dir "$OUT_DIR/shards" --workers "$WORKERS"

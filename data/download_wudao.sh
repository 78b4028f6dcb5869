#!/usr/bin/env bash
# Get WuDaoCorpora 2.0 and shard it:  bash data/download_wudao.sh [OUT_DIR] [URL_OR_ARCHIVE_OR_FOLDER]
#   WuDao needs its licence accepted first; run without a source to see where and how.
#   The source may also be given as WUDAO_SOURCE. OUT_DIR (default corpus/wudao) gets the download
#   and extracted JSON files (json/) and the shards (shards/part-wudao-*.jsonl.zst).
#   SHARD_WORKERS  sharder processes (default: number of CPUs)
# Interrupted? Run the same command again: the download resumes and sharding continues.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
# Paths given by the user are relative to where they ran the script; the commands run from the repository.
abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
OUT_DIR="$(abspath "${1:-corpus/wudao}")"
SOURCE="${2:-${WUDAO_SOURCE:-}}"
case "$SOURCE" in ""|http://*|https://*) ;; *) SOURCE="$(abspath "$SOURCE")" ;; esac
cd "$(dirname "$0")/.."
# The repository's .venv when there is one (looked up after the cd, so it is found from anywhere).
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WORKERS="${SHARD_WORKERS:-$(nproc 2>/dev/null || echo 1)}"

if [ -z "$SOURCE" ]; then
    "$PYTHON" data/download.py wudao --output_dir "$OUT_DIR"   # prints what to do, exits 2
fi
JSON_DIR="$("$PYTHON" data/download.py wudao "$SOURCE" --output_dir "$OUT_DIR")"
"$PYTHON" data/shard.py "$JSON_DIR" --format wudao --source wudao \
    --output_dir "$OUT_DIR/shards" --workers "$WORKERS"

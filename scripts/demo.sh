#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run pmaccel on the shipped example rows with the embedded
# SmolLM2-135M-Instruct (on the GPU if there is one, else on the CPU). pmaccel itself prints every
# question of the example with its whole answer, once. Flags are passed on to pmaccel and win over
# the demo's own:  bash scripts/demo.sh --max_new_tokens 128 --chat_template
set -euo pipefail
PMACCEL_EXTRAS=${PMACCEL_EXTRAS:-peft}
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"

say() { printf 'pmaccel demo: %s\n' "$*"; }

# 48 new tokens: a sentence or two per branch, decoded in seconds on two CPU cores (pmaccel's
# default, 128, mostly adds repetition there).
MAX_NEW_TOKENS=48
OUT=out/demo.jsonl

own_model=0
for arg in "$@"; do
    case $arg in --base_model | --base_model=*) own_model=1 ;; esac
done
# The first run converts the embedded GGUF into the cache (tens of seconds): a step of its own, in
# a process of its own, announced before it starts.
if [ "$own_model" = 0 ]; then
    target=$(python -c 'from pmaccel.embedded import EMBEDDED_MODEL_NAME as n, cache_root; print(cache_root() / n)')
    if [ ! -f "$target/config.json" ]; then
        say "converting the embedded model once into $target (about 40 s on 2 CPU cores; later runs load it in a second)"
        python -c 'import sys
from pmaccel.embedded import embedded_model_dir
from pmaccel.errors import PMAccelError
try:
    embedded_model_dir()
except PMAccelError as e:
    sys.exit(f"pmaccel: error: {e}")'
    fi
fi

say "running pmaccel on the shipped example rows: pmaccel --out_path $OUT --max_new_tokens $MAX_NEW_TOKENS${*:+ $*}"
mkdir -p out
pmaccel --out_path "$OUT" --max_new_tokens "$MAX_NEW_TOKENS" "$@"
say "done: the answers are in $OUT (longer ones: bash scripts/demo.sh --max_new_tokens 128)"

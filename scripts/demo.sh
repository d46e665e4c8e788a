#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run pmaccel on the shipped example data with the embedded
# SmolLM2-135M-Instruct model (on the GPU if there is one, else on the CPU).
set -euo pipefail
PMACCEL_EXTRAS=${PMACCEL_EXTRAS:-peft}
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
mkdir -p out
pmaccel --out_path out/demo.jsonl "$@"
python - <<'PY'
import json
for rec in map(json.loads, open("out/demo.jsonl")):
    print("=" * 72)
    print("main:", rec.get("main", "")[:200])
    for b, o in zip(rec["branches"], rec["outputs"]):
        text = b if isinstance(b, str) else b.get("text", b)
        print(f"  > {text}\n    {o.strip()[:300]!r}")
PY

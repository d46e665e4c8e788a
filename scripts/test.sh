#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on the CPU; GPU tests skip without CUDA.
# Arguments are passed on to pytest: bash scripts/test.sh -x tests/test_cli.py
set -euo pipefail
# The tests run on the torch they name: the CPU build of torch==2.13.0 (see scripts/setup.sh).
export TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"

say() { printf 'pmaccel test: %s\n' "$*"; }

# A torch that was already in .venv (say the demo's CUDA build on a GPU machine) is kept by
# setup.sh. Without a GPU it is replaced by the named one; with a GPU it is kept for the GPU tests,
# and said so loudly.
torch_info() { python -W ignore -c 'import torch; print(torch.__version__, torch.version.cuda or "")'; }
read -r have cuda <<<"$(torch_info)"
case $TORCH_SPEC in
    torch==*) want=${TORCH_SPEC#torch==} ;;
    *) want="" ;;
esac
if [ -n "$want" ] && [ "${have%%+*}" != "$want" ]; then
    if has_nvidia_gpu; then
        say "WARNING: running the tests on torch $have already in .venv (kept for the GPU), not $TORCH_SPEC"
    else
        say "replacing torch $have in .venv with $TORCH_SPEC (CPU build: no NVIDIA GPU found)"
        python -m pip install -q "$TORCH_SPEC"
        read -r have cuda <<<"$(torch_info)"
    fi
fi
build=${cuda:+CUDA $cuda build}
say "running on torch $have (${build:-CPU build})"

# The real-browser test drives Debian's Chromium, installed here if missing. When that cannot be
# done, only that test is skipped, with the reason (tests/test_browser.py reads PMACCEL_SKIP_BROWSER).
if ! reason=$(bash scripts/install_browser.sh); then
    export PMACCEL_SKIP_BROWSER=${reason:-Chromium could not be installed}
    say "the browser test will be skipped: $PMACCEL_SKIP_BROWSER"
fi

say "checking the code with ruff"
ruff check -q pmaccel tests benchmarks
say "running the test suite (pytest)"
python -m pytest -q -rs -p no:cacheprovider "$@"

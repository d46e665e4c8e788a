"""pmaccel: parallel (multi-branch) inference for Hugging Face causal LMs.

Several branches (prompts), optionally sharing one context called ``main``, are packed into one
sequence and decoded together: every step emits one token for every unfinished branch in a single
forward. See ``load_model``, ``generate``, ``infer`` and ``score``.

The heavy imports (torch, transformers, accelerate, datasets) happen on first use, so
``import pmaccel`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "pmaccel.model",
    "generate": "pmaccel.decode",
    "Engine": "pmaccel.engine",  # generate(..., engine=Engine(model)) keeps graphs and KV memory across calls
    "EngineConfig": "pmaccel.engine",
    "infer": "pmaccel.inference",
    "score": "pmaccel.scoring",  # the module is not named "score": importing it would shadow the function
    "Settings": "pmaccel.settings",
    "PMAccelError": "pmaccel.errors",
    "inspect": "pmaccel.widget",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pmaccel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

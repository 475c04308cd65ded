"""The reranking language model: loading it once, prompting it, and reading its answers.

`from recsys.llm import load_model, prepare_model, LoadedModel, PROMPT_VERSION` works, but
the loading names are imported on first use, so code that only needs the prompts or the
parsers does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

from recsys.llm.prompts import PROMPT_VERSION

_LAZY = {
    "LoadedModel": "recsys.llm.loading",
    "ModelLoadError": "recsys.llm.acquisition",
    "clear_model_cache": "recsys.llm.loading",
    "load_model": "recsys.llm.loading",
    "prepare_model": "recsys.llm.acquisition",
    "resolve_device": "recsys.llm.device",
    "resolve_dtype": "recsys.llm.device",
    "wrap_model": "recsys.llm.loading",
}

__all__ = ["PROMPT_VERSION", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

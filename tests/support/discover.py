"""Fixtures shared by the discover tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm_folder(tiny_llm, tmp_path_factory) -> str:
    """The tiny random-weight Gemma 3 saved as a model folder, so settings (and a worker process) can
    name it as RECSYS_LLM_MODEL like any local model."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_llm.model.save_pretrained(folder)
    tiny_llm.tokenizer.save_pretrained(folder)
    return str(folder)

"""Load the reranking language model once per process and reuse it (the per-process cache).

`prepare_model` (llm.acquisition) makes the model available on disk; `resolve_device` and
`resolve_dtype` (llm.device) choose where and how it runs; this module loads and keeps it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from recsys.config import Settings
from recsys.llm.acquisition import ModelLoadError, prepare_model
from recsys.llm.device import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

END_OF_TURN_TOKEN = "<end_of_turn>"

__all__ = ["END_OF_TURN_TOKEN", "LoadedModel", "ModelLoadError", "clear_model_cache", "configure_tokenizer",
           "load_from_folder", "load_model", "speed_up_output_head", "wrap_model"]


@dataclass(eq=False)
class LoadedModel:
    """A causal LM ready for ranking: weights on their device, tokenizer padding on the left."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """End-of-sequence ids, plus Gemma's end-of-turn marker where the vocabulary has one."""
        ids = {int(self.tokenizer.eos_token_id)}
        vocab = self.tokenizer.get_vocab()
        if END_OF_TURN_TOKEN in vocab:
            ids.add(int(vocab[END_OF_TURN_TOKEN]))
        return sorted(ids)

    @cached_property
    def newline_token_ids(self) -> frozenset[int]:
        """Ids of tokens that contain a line break, so stopping rules decode only when needed."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return frozenset(
            index for index, piece in enumerate(pieces) if piece and ("\n" in piece or piece == "<0x0A>")
        )


def configure_tokenizer(tokenizer):
    """Left padding (batched generation needs it) and a pad token that exists."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _standard_strides(module, args):
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


def speed_up_output_head(model: torch.nn.Module) -> None:
    """Give the output head inputs with standard strides.

    Models slice the last position (`hidden[:, -1:, :]`) before the vocabulary projection.
    That slice keeps the long sequence's strides, and torch.matmul then expands the
    256k x 640 weight per row into a batched copy: 0.5-1.5 s per forward pass on CPU instead
    of ~15 ms. A fresh contiguous copy of the (small) input avoids it.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_recsys_strides_fixed", False):
        return
    head.register_forward_pre_hook(_standard_strides)
    head._recsys_strides_fixed = True


def _ready_for_inference(model: torch.nn.Module) -> None:
    model.eval()
    model.requires_grad_(False)
    speed_up_output_head(model)


def load_from_folder(folder: Path, *, device: torch.device, dtype: torch.dtype, name: str) -> LoadedModel:
    """Load a Hugging Face-layout folder onto `device` in `dtype`, ready for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = configure_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.to(device)
    _ready_for_inference(model)
    log.info("loaded %s on %s (%s) in %.1f s", name, device, dtype, time.perf_counter() - started)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, name=name)


def wrap_model(model: torch.nn.Module, tokenizer, *, name: str) -> LoadedModel:
    """A LoadedModel around weights already in memory (tests, benchmarks)."""
    _ready_for_inference(model)
    parameter = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=configure_tokenizer(tokenizer),
        device=parameter.device,
        dtype=parameter.dtype,
        name=name,
    )


_cache: dict[tuple[str, str, str], LoadedModel] = {}
_cache_lock = threading.Lock()


def load_model(
    settings: Settings,
    *,
    model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """The process-wide model for these settings, loaded (and prepared) on first use only."""
    name = model_name or settings.llm_model
    resolved_device = resolve_device(device or settings.device)
    resolved_dtype = resolve_dtype(dtype or settings.dtype, resolved_device)
    key = (name, str(resolved_device), str(resolved_dtype))
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        folder = prepare_model(settings, model_name=name)
        loaded = load_from_folder(folder, device=resolved_device, dtype=resolved_dtype, name=name)
        _cache[key] = loaded
        return loaded


def clear_model_cache() -> None:
    """Forget loaded models (tests; freeing memory in a long-lived process)."""
    with _cache_lock:
        _cache.clear()



"""Random-weight models built from a config, for tests and benchmarks.

They load in milliseconds and exercise exactly the code paths of a real checkpoint (same
architecture classes, same tokenizer), only their answers are noise. Real weights are only
ever read from the model cache or a package, never downloaded here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from recsys.llm.acquisition import save_packaged_tokenizer
from recsys.llm.loading import LoadedModel, configure_tokenizer, wrap_model

_tokenizers: dict[Path, object] = {}
_tokenizers_lock = threading.Lock()


def packaged_tokenizer(cache_dir: Path, key: str = "gemma-3-270m"):
    """The packaged model's tokenizer, extracted once into `cache_dir` and loaded once per process."""
    from transformers import AutoTokenizer

    folder = Path(cache_dir).resolve()
    with _tokenizers_lock:
        if folder not in _tokenizers:
            save_packaged_tokenizer(folder, key)
            _tokenizers[folder] = configure_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
        return _tokenizers[folder]


def tiny_gemma3_config(vocab_size: int):
    """A two-layer Gemma 3 text model: same code paths as the 270M, a fraction of its cost."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=4096,
        sliding_window=512,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )


def gemma_2b_config():
    """google/gemma-2b(-it)'s architecture, for timing it without its weights."""
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=256_000,
        hidden_size=2048,
        intermediate_size=16_384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )


def random_model(
    config,
    tokenizer,
    *,
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """A causal LM with random weights for `config`, wrapped like a loaded checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return wrap_model(model, tokenizer, name=name)

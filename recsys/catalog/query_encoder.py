"""A light query encoder: the sentence-transformers BERT forward pass in numpy, for a few queries at a time.

A command-line search or a web request encodes one query. Loading torch, transformers and
sentence-transformers for that costs several seconds (20+ s on a loaded 2-core machine) while
the forward pass itself is milliseconds. This module reads the same folder (tokenizer.json,
config.json, model.safetensors) with `tokenizers` and `safetensors` and runs the same
float32 computation in numpy: vectors agree with sentence-transformers' float32 output to
within 3e-7 per component (tests/test_query_encoder.py).

Only the shape the default model has is supported: a BERT encoder, mean pooling, L2
normalization. `light_encoder_for` returns None for anything else, and the caller uses
sentence-transformers instead.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_SQRT_HALF = np.float32(math.sqrt(0.5))
_encoders: dict[str, LightQueryEncoder | None] = {}
_lock = threading.Lock()


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.5e-7 (Abramowitz & Stegun 7.1.26); numpy has none and scipy is slow to import."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t
    return sign * (1.0 - poly * np.exp(-a * a))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _supported(folder: Path) -> bool:
    """A BERT model with mean pooling and normalization, as sentence-transformers saves it."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        pooling_path = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = json.loads((folder / pooling_path / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        return False
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    pooling_modes = {key for key, value in pooling.items() if key.startswith("pooling_mode") and value}
    return (
        types == ["Transformer", "Pooling", "Normalize"]
        and config.get("model_type") == "bert"
        and config.get("hidden_act") == "gelu"
        and config.get("position_embedding_type", "absolute") == "absolute"
        and pooling_modes == {"pooling_mode_mean_tokens"}
        and (folder / "tokenizer.json").is_file()
        and (folder / "model.safetensors").is_file()
    )


class LightQueryEncoder:
    """The numpy forward pass of one supported model folder; thread-safe (it only reads its weights)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.config = json.loads((folder / "config.json").read_text())
        st_config = folder / "sentence_bert_config.json"
        max_length = json.loads(st_config.read_text()).get("max_seq_length", 256) if st_config.is_file() else 256
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        weights = safe_open(str(folder / "model.safetensors"), framework="np")
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights.keys() else ""
        self.weights = {
            key[len(prefix):]: weights.get_tensor(key).astype(np.float32, copy=False)
            for key in weights.keys()
            if key.startswith(prefix) and not key.endswith("position_ids")
        }

    def encode_one(self, text: str) -> np.ndarray:
        """The normalized float32 embedding of one text."""
        config, w = self.config, self.weights
        heads = config["num_attention_heads"]
        head_dim = config["hidden_size"] // heads
        eps = config["layer_norm_eps"]
        ids = self.tokenizer.encode(text).ids
        n = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for layer in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{layer}."

            def dense(name: str, value: np.ndarray, p: str = p) -> np.ndarray:
                return value @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (
                dense(f"attention.self.{part}", x).reshape(n, heads, head_dim).transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) * scale
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(1, 0, 2).reshape(n, heads * head_dim)
            x = _layer_norm(x + dense("attention.output.dense", context),
                            w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            hidden = dense("intermediate.dense", x)
            hidden = 0.5 * hidden * (1.0 + _erf(hidden * _SQRT_HALF))
            x = _layer_norm(x + dense("output.dense", hidden),
                            w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        pooled = x.mean(0)
        return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """One row per text. BLAS runs on one thread: for matrices this small, more threads only wait
        for each other (10× slower on the loaded 2-core machine)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            return np.stack([self.encode_one(text) for text in texts]).astype(np.float32, copy=False)


def light_encoder_for(model_path: str) -> LightQueryEncoder | None:
    """The light encoder for a local model folder (once per process), or None when it cannot be used."""
    with _lock:
        if model_path in _encoders:
            return _encoders[model_path]
        folder = Path(model_path)
        encoder = None
        if folder.is_dir() and _supported(folder):
            started = time.perf_counter()
            try:
                encoder = LightQueryEncoder(folder)
            except Exception as exc:  # any unreadable file: sentence-transformers will say what is wrong
                log.warning("light query encoder unavailable for %s: %s", model_path, exc)
            else:
                log.info("loaded the light query encoder for %s in %.2f s", model_path, time.perf_counter() - started)
        _encoders[model_path] = encoder
        return encoder

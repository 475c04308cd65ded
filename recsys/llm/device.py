"""Where and in what precision the LLM runs: `RECSYS_DEVICE` and `RECSYS_DTYPE` resolved for this machine."""

from __future__ import annotations

import torch

from recsys.platform.hardware import cpu_has_native_bf16

_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}



def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU; anything else must be a valid torch device."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {requested!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for but CUDA is not available")
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA and on CPUs with native bf16 (about 3x faster than fp32), else fp32."""
    requested = (requested or "auto").strip().lower()
    if requested != "auto":
        if requested not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {requested!r}; use auto, {', '.join(sorted(_DTYPE_NAMES))}")
        return _DTYPE_NAMES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32

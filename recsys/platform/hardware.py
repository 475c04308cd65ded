"""What this machine's CPU can do, decided once for every part that cares (LLM dtype, query encoding)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_has_native_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX).

    Without them bf16 is only emulated and slower than fp32, so `auto` precisions pick fp32.
    Read from /proc/cpuinfo (no torch import); where that file does not exist, ask oneDNN.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return _onednn_bf16()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _onednn_bf16() -> bool:
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False

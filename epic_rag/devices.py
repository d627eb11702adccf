"""Where a model runs and in what precision, and whether it fits there before it loads.

Names are checked without torch (the CLI parses them before anything heavy loads);
`resolve_device` and `resolve_dtype` turn them into what torch takes, with the defaults:
the best device present (CUDA, then MPS, then the CPU), float32 on the CPU and MPS,
bfloat16 on CUDA. `check_fits` refuses a model whose weights plus the KV of a working
context (8,192 tokens, or its whole window when shorter) exceed the memory the device has
free, with the numbers, before minutes of loading.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the benchmarks' older spellings
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
WORKING_CONTEXT = 8192  # tokens of KV counted by the fit check (one long RAG prompt and its answer)


class ModelDoesNotFitError(ValueError):
    """The model's weights and context KV exceed the device's free memory (the message has the numbers)."""


def device_name(text: str) -> str:
    """'cpu', 'mps', 'cuda' or 'cuda:N' (checked, torch-free); a clear error otherwise."""
    name = text.strip().lower()
    if not _DEVICE.match(name):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps")
    return name


def dtype_name(text: str) -> str:
    """'float32', 'bfloat16' or 'float16' (fp32/bf16/fp16 accepted), torch-free."""
    name = _ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {text!r}: use {', '.join(DTYPE_NAMES)}")
    return name


def resolve_device(device: str | torch.device | None) -> str:
    """The device to load on: the one named (it must be present), else the best one present."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    name = device_name(str(device))
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' asked for, but this torch sees no MPS device; use --device cpu")
    return name


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The compute dtype: the one named, else bfloat16 on CUDA and float32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype_name(dtype) if dtype is not None else ("bfloat16" if device.startswith("cuda") else "float32")
    return getattr(torch, name)


def free_bytes(device: str) -> int | None:
    """Memory the device has free now (None when it cannot be known): CUDA's own count, MPS's
    recommended working set, the CPU's MemAvailable (Linux)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device == "mps":
        return int(torch.mps.recommended_max_memory()) - int(torch.mps.current_allocated_memory())
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def model_bytes(config, dtype: torch.dtype, context: int | None = None) -> tuple[int, int]:
    """(weights, KV of `context` tokens: default WORKING_CONTEXT or the window) in bytes, from a HF
    decoder config: embeddings (and an untied output head), attention with its KV heads, the
    gated MLP; norms and biases are too small to count."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    per_layer = attention + 3 * hidden * inter  # gate, up, down
    embeddings = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    weights = (embeddings + layers * per_layer) * dtype.itemsize
    tokens = context if context is not None else min(WORKING_CONTEXT, int(config.max_position_embeddings))
    kv = 2 * layers * kv_heads * head_dim * tokens * dtype.itemsize
    return weights, kv


def check_fits(config, dtype: torch.dtype, device: str, available: int | None = None) -> None:
    """Raise ModelDoesNotFitError, with the numbers, when the weights plus the KV of a working
    context exceed `available` bytes (default: what `device` has free now)."""
    available = free_bytes(device) if available is None else available
    if available is None:
        return
    weights, kv = model_bytes(config, dtype)
    tokens = min(WORKING_CONTEXT, int(config.max_position_embeddings))
    if weights + kv > available:
        gib = 2**30
        name = str(dtype).removeprefix("torch.")
        raise ModelDoesNotFitError(
            f"the model needs about {(weights + kv) / gib:.1f} GiB on {device} ({weights / gib:.1f} GiB of weights "
            f"in {name} + {kv / gib:.1f} GiB of KV for a {tokens}-token prompt) but "
            f"{device} has {available / gib:.1f} GiB free: pick a smaller --dtype, another --device, or a smaller model"
        )

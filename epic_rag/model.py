"""Load a causal LM and decide whether its positions can be re-rotated exactly.

epic-rag moves cached keys to new positions with one extra RoPE rotation. That is
exact only when every layer applies full rotary embeddings, with position-independent
inverse frequencies, through the model's own rotary module. This module checks that
at load time and refuses anything else with the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import check_fits, resolve_device, resolve_dtype
from .offline import builtin_name, ensure_converted_gguf, offline_model_folder

# model_type -> family name; each has model.model.{embed_tokens, layers, norm, rotary_emb}.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# Rope types whose inverse frequencies do not depend on the sequence length; a pure
# rotation by the offset moves a key exactly (YaRN's attention factor is applied once,
# at encoding time, and never by the re-rotation).
EXACT_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class UnsupportedModelError(ValueError):
    """The model cannot be served with position-independent caching (and why)."""


@dataclass(frozen=True)
class RotaryFacts:
    """What the re-rotation needs: the model's own inverse frequencies."""

    inv_freq: torch.Tensor  # [head_dim // 2], float32, as the model uses them
    rope_type: str


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        params = dict(params)
    return params


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` naming the architecture and the reason, or return."""
    model_type = getattr(config, "model_type", "?")
    arch = ", ".join(getattr(config, "architectures", None) or []) or model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        if model_type in {"gpt2", "gpt_neo", "opt", "bloom", "bert", "gpt_bigcode"}:
            why = "it uses absolute or ALiBi positions, not rotary embeddings, so cached keys cannot be moved"
        else:
            why = "its attention is not one epic-rag has verified to use full rotary embeddings"
        raise UnsupportedModelError(
            f"unsupported architecture {arch} (model_type={model_type!r}): {why}. "
            f"Supported families: {', '.join(SUPPORTED_MODEL_TYPES.values())}."
        )
    params = _rope_parameters(config)
    if "rope_type" not in params and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError(
            f"unsupported architecture {arch}: it uses different rotary settings per layer type, "
            "which one re-rotation cannot serve"
        )
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(
            f"unsupported architecture {arch}: partial rotary embeddings (factor {partial}) leave part of "
            "each key position-free; epic-rag needs full rotary embeddings"
        )
    rope_type = params.get("rope_type", "default")
    if rope_type not in EXACT_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch}: rope type {rope_type!r} changes its frequencies with the "
            f"sequence length, so a cached key cannot be rotated exactly. Exact types: {sorted(EXACT_ROPE_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    max_pos = getattr(config, "max_position_embeddings", None)
    sliding = any(t != "full_attention" for t in layer_types) or (
        window is not None and max_pos is not None and window < max_pos
    )
    if sliding:
        raise UnsupportedModelError(
            f"unsupported architecture {arch}: sliding-window attention layers (window {window}) see only "
            "part of the linked context. If the checkpoint does not really use a window, set "
            "config.sliding_window = None"
        )


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a HF decoder config: the shape of its KV cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


def rotary_facts(model) -> RotaryFacts:
    """Inverse frequencies of the loaded model, checked against its head size."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().float().cpu()
    head_dim = kv_geometry(model.config)[2]
    if inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModelError(
            f"unsupported model: rotary embeddings cover {inv_freq.numel() * 2} of {head_dim} head dimensions"
        )
    return RotaryFacts(inv_freq=inv_freq, rope_type=_rope_parameters(model.config).get("rope_type", "default"))


FINGERPRINT_SCHEMES = ("bits", "float-sum")  # the current one first; "float-sum": manifests that name none
_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(model, scheme: str = FINGERPRINT_SCHEMES[0]) -> str:
    """A hash of the config, the dtype and the weights: scopes cache entries to a model.

    Every tensor contributes its name, shape, a checksum and a strided sample of its
    values, so a different checkpoint or dtype gives a different fingerprint without
    hashing gigabytes at every load. "bits" sums the raw bit patterns as integers: exact
    in any order, so the same weights give the same fingerprint on every device (a CPU-built
    index opens on a GPU). "float-sum", a float64 sum, is kept to open indexes keyed with it
    on the device that built them. The checksum runs where the tensor is, in pieces; only the
    4,096-value sample leaves the device.
    """
    if scheme not in FINGERPRINT_SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}; use one of {', '.join(FINGERPRINT_SCHEMES)}")
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    for volatile in ("transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(repr(_bit_sum(flat) if scheme == "bits" else _float_sum(flat)).encode())
            digest.update(flat[::step].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _bit_sum(flat: torch.Tensor) -> int:
    """The sum of a tensor's bit patterns read as integers, modulo 2**64: order-free, so every
    device agrees. Summed in pieces of 16M values, so no whole-tensor copy is made."""
    ints = flat.view(_INT_OF_WIDTH[flat.element_size()])
    return sum(int(piece.sum(dtype=torch.int64)) for piece in ints.split(1 << 24)) % (1 << 64)


def _float_sum(flat: torch.Tensor) -> float:
    """The float64 sum the "float-sum" scheme hashes (float32 on MPS, which has no float64)."""
    return float(flat.sum(dtype=torch.float32 if flat.device.type == "mps" else torch.float64))


def resolve_model_folder(spec: str | Path) -> str:
    """Turn a built-in name, a .gguf file, a folder or a hub id into something `from_pretrained` takes."""
    text = str(spec)
    if builtin_name(text) is not None:
        return str(offline_model_folder(text))
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(ensure_converted_gguf([path]))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
        return str(path)
    return text  # a hub id: transformers resolves it (and fails clearly when offline)


def load_tokenizer(spec: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a model alone (seconds, no weights): to size inputs before loading it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_folder(spec), trust_remote_code=trust_remote_code)


def load_model(
    spec: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """Load (model, tokenizer) from a built-in name, .gguf, folder or hub id; refuse what we cannot
    serve, and what will not fit the device (before loading). Defaults: see `epic_rag.devices`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = resolve_model_folder(spec)
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    check_supported(config)
    check_fits(config, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), tokenizer

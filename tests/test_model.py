"""Load-time refusals, fingerprints and model resolution."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from epic_rag import EpicEngine, UnsupportedModelError, check_supported, fingerprint, load_model

from .conftest import CharTokenizer, tiny_config, tiny_model


def test_absolute_positions_refused_with_reason():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*absolute"):
        EpicEngine(model, CharTokenizer())


@pytest.mark.parametrize(
    "family, overrides, reason",
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dynamic"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial rotary",
        ),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 256, "max_window_layers": 0}, "sliding-window"),
    ],
)
def test_unexact_rotary_refused(family, overrides, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        check_supported(tiny_config(family, **overrides))


def test_mistral_window_refused_unless_disabled():
    from transformers import MistralConfig

    with pytest.raises(UnsupportedModelError, match="sliding_window = None"):
        check_supported(MistralConfig(sliding_window=1024, max_position_embeddings=8192))
    check_supported(tiny_config("mistral"))


def test_fingerprint_tracks_weights_and_dtype():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 0.25
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(tiny_model(seed=0).to(torch.bfloat16))


def test_missing_sources_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_offline_models_are_pinned_and_verified(tmp_path):
    from epic_rag.offline import OFFLINE_MODELS, ensure_converted_gguf, offline_model_folder, sha256_files

    smollm2 = OFFLINE_MODELS["smollm2-135m-instruct"]
    assert sha256_files(smollm2.locate_parts()) == smollm2.sha256
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ensure_converted_gguf([fake], expected_sha256="0" * 64)
    with pytest.raises(KeyError, match="unknown built-in model"):
        offline_model_folder("gpt-5")


def test_conversion_cache_dir_is_overridable(tmp_path, monkeypatch):
    from epic_rag.offline import CACHE_ENV, converted_folder

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert converted_folder("ab" * 32).is_relative_to(tmp_path)


def test_builtin_names_and_the_old_alias():
    from epic_rag.offline import ALIASES, DEFAULT_MODEL, OFFLINE_MODELS, builtin_name

    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct" and "Coder" in OFFLINE_MODELS[DEFAULT_MODEL].description
    assert builtin_name("qwen2.5-0.5b-instruct") == DEFAULT_MODEL == ALIASES["qwen2.5-0.5b-instruct"]
    assert builtin_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert builtin_name("Qwen/Qwen2.5-7B-Instruct") is None  # a hub id stays a hub id


def test_the_bits_checksum_is_exact_in_any_order():
    """What makes the fingerprint the same on every device: an integer sum of the bit patterns
    does not depend on the order a device's reduction adds them in (a float64 sum does)."""
    from epic_rag.model import _bit_sum

    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 1e3
    shuffled = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(1))]
    expected = sum(int(b) for b in values.view(torch.int32).tolist()) % (1 << 64)
    assert _bit_sum(values) == _bit_sum(shuffled) == expected
    assert _bit_sum(values.to(torch.bfloat16)) == sum(
        int(b) for b in values.to(torch.bfloat16).view(torch.int16).tolist()
    ) % (1 << 64)
    values[17] = torch.nextafter(values[17], values[17] * 2)  # one ulp away from zero: its bits + 1
    assert _bit_sum(values) == expected + 1


def test_fingerprint_schemes_differ_and_an_unknown_one_is_refused():
    model = tiny_model(seed=0)
    assert fingerprint(model) == fingerprint(model, "bits") != fingerprint(model, "float-sum")
    with pytest.raises(ValueError, match="unknown fingerprint scheme 'crc'; use one of bits, float-sum"):
        fingerprint(model, "crc")

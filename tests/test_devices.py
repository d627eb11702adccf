"""Device and dtype names, their defaults, and the fit check before a model loads."""

from __future__ import annotations

import pytest
import torch

from epic_rag.devices import (
    ModelDoesNotFitError,
    check_fits,
    device_name,
    dtype_name,
    model_bytes,
    resolve_device,
    resolve_dtype,
)

from .conftest import SMOLLM2, tiny_config, tiny_model
from .test_cli_light import run_cli


@pytest.mark.parametrize(("text", "name"), [("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"), ("mps", "mps")])
def test_device_names(text, name):
    assert device_name(text) == name


@pytest.mark.parametrize(("text", "name"), [("bf16", "bfloat16"), ("float16", "float16"), ("FP32", "float32")])
def test_dtype_names(text, name):
    assert dtype_name(text) == name


@pytest.mark.parametrize(("parse", "text"), [(device_name, "gpu"), (device_name, "cuda:x"), (dtype_name, "fp8")])
def test_bad_names_say_what_to_use(parse, text):
    with pytest.raises(ValueError, match="use "):
        parse(text)


def test_defaults_follow_the_device():
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    assert resolve_dtype(None, "cuda") == torch.bfloat16 and resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_an_absent_cuda_names_the_fix():
    with pytest.raises(ValueError, match="no CUDA device; use --device cpu"):
        resolve_device("cuda")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_estimate_equals_the_matrices_a_model_holds(family, dtype):
    """Every weight matrix counted (norms and biases are vectors, left out), in the dtype."""
    model = tiny_model(family).to(dtype)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2) * dtype.itemsize
    weights, kv = model_bytes(model.config, dtype, context=100)
    assert weights == matrices
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert kv == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 100 * dtype.itemsize


def test_a_model_that_does_not_fit_is_refused_with_the_numbers():
    config = tiny_config("llama")
    weights, kv = model_bytes(config, torch.float32)
    check_fits(config, torch.float32, "cpu", available=weights + kv)  # exactly enough
    with pytest.raises(ModelDoesNotFitError, match=r"GiB of weights in float32 \+ .* GiB of KV for a .*-token prompt"):
        check_fits(config, torch.float32, "cuda:0", available=weights + kv - 1)


def test_cli_refuses_a_bad_device_before_anything_heavy_loads():
    result, stderr = run_cli(["ask", "q?", "--index", "nowhere", "--device", "gpu"])
    assert result == {"code": 2, "heavy": []}
    assert "unknown device 'gpu': use cpu, cuda, cuda:N or mps" in stderr


@pytest.mark.slow
def test_an_index_opens_only_in_the_dtype_it_was_built_in(sample_index, smollm2):
    from epic_rag.app.index import open_index, read_manifest

    assert read_manifest(sample_index).dtype is None  # float32, written as older epic-rag wrote it
    with pytest.raises(ValueError, match="computed in float32, not bfloat16: use --dtype float32"):
        open_index(sample_index, dtype="bf16")
    app = open_index(sample_index, model=SMOLLM2, dtype="float32", device="cpu")
    assert app.engine.model.dtype == torch.float32 and app.embed.device == "cpu"


@pytest.mark.slow
def test_build_index_in_bfloat16_records_it_and_answers(tmp_path):
    from epic_rag.app.index import build_index, open_index, read_manifest

    from .conftest import SAMPLE_DOCS

    build_index(SAMPLE_DOCS, tmp_path, model=SMOLLM2, show_progress=False, dtype="bfloat16", device="cpu")
    assert read_manifest(tmp_path).dtype == "bfloat16"
    app = open_index(tmp_path, max_new_tokens=8)
    assert app.engine.model.dtype == torch.bfloat16
    response, handoff = app.ask("What is the warranty on a Skylark buoy?")
    call = handoff.first_call  # every retrieved node's bf16 KV found in the index's store
    assert (call.chunk_hits, call.chunk_misses) == (len(response.source_nodes), 0)

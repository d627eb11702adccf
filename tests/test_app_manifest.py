"""The index manifest: manifests written before it was a pydantic model still read, what it writes
older versions read too, and a malformed one is a clear error naming the file and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from epic_rag.app.manifest import MANIFEST, IndexManifest, read_manifest

# written by `epic-rag index` before the manifest was a pydantic model (json.dumps of a dataclass)
BEFORE_PYDANTIC = """{
  "model": "smollm2-135m-instruct",
  "fingerprint": "efeef60a791554530f65e2667b8e254b99ae191bb1eb1c32fb1548690f8b4988",
  "embed_model": "all-MiniLM-L6-v2",
  "documents": 4,
  "nodes": 4,
  "chunking": {
    "target_tokens": 256,
    "max_tokens": 384,
    "min_tokens": 48
  },
  "policy": null,
  "calibration": {},
  "documents_digest": "9998247d64a5f3937a29687cfe44d5f60c1abfd718f52e80e248ac4ecdb81afb",
  "compile": "alone",
  "vector_store": null
}"""
# written before documents_digest, compile and vector_store existed, then calibrated
FIRST_RELEASE = {
    "model": "qwen2.5-coder-0.5b-instruct",
    "fingerprint": "ab" * 32,
    "embed_model": "all-MiniLM-L6-v2",
    "documents": 23,
    "nodes": 117,
    "chunking": {"target_tokens": 256, "max_tokens": 384, "min_tokens": 48},
    "policy": "attnlink:16",
    "calibration": {"samples": 12, "seed": 0, "scores": [{"policy": "attnlink:16", "kl": 0.031}]},
}


def index_with(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / MANIFEST).write_text(text)
    return folder


def test_a_manifest_written_before_the_model_reads_and_writes_back_byte_for_byte(tmp_path):
    index = index_with(tmp_path, BEFORE_PYDANTIC)
    manifest = read_manifest(index)
    assert (manifest.model, manifest.documents, manifest.nodes) == ("smollm2-135m-instruct", 4, 4)
    assert manifest.chunking == {"target_tokens": 256, "max_tokens": 384, "min_tokens": 48}
    assert manifest.policy is None and manifest.compile == "alone" and manifest.vector_store is None
    manifest.write(index)
    assert (index / MANIFEST).read_text() == BEFORE_PYDANTIC  # older epic-rag reads what this one writes


def test_a_first_release_manifest_reads_with_the_later_fields_defaulted(tmp_path):
    manifest = read_manifest(index_with(tmp_path, json.dumps(FIRST_RELEASE)))
    assert manifest.policy == "attnlink:16" and manifest.calibration["scores"][0]["kl"] == 0.031
    assert (manifest.documents_digest, manifest.compile, manifest.vector_store) == (None, "alone", None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"model": "smollm2-135m-instruct",', "not JSON: EOF while parsing a value at line 1 column 34"),
        ("[1, 2]", "Input should be an object"),
        (json.dumps({k: v for k, v in FIRST_RELEASE.items() if k != "fingerprint"}), "field 'fingerprint' is missing"),
        (json.dumps({**FIRST_RELEASE, "nodes": "117"}), "field 'nodes': Input should be a valid integer, got '117'"),
        (json.dumps({**FIRST_RELEASE, "policy": 16}), "field 'policy': Input should be a valid string, got 16"),
        (json.dumps({**FIRST_RELEASE, "colour": "red"}), "unknown field 'colour'"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_file_and_the_fix(tmp_path, text, problem):
    index = index_with(tmp_path, text)
    with pytest.raises(ValueError) as err:
        read_manifest(index)
    assert str(err.value) == (
        f"{index / MANIFEST} is not a valid epic-rag index manifest ({problem}); rebuild the index with "
        f"`epic-rag index DOCS_DIR --index {index}`"
    )


def test_the_command_line_prints_a_malformed_manifest_as_an_error_and_exits_2(tmp_path):
    index = index_with(tmp_path, json.dumps({**FIRST_RELEASE, "nodes": -1.5}))
    done = subprocess.run(
        [sys.executable, "-m", "epic_rag.cli", "ask", "Anything?", "--index", str(index)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"epic-rag: error: {index / MANIFEST} is not a valid epic-rag index manifest (field 'nodes': Input should "
        f"be a valid integer, got -1.5); rebuild the index with `epic-rag index DOCS_DIR --index {index}`\n"
    )


def test_a_field_set_to_the_wrong_type_is_refused_before_it_is_written(tmp_path):
    manifest = IndexManifest.model_validate(FIRST_RELEASE)
    with pytest.raises(ValueError, match="policy"):
        manifest.policy = 16
    manifest.policy = "full"
    manifest.write(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text()) == {
        **FIRST_RELEASE,
        "policy": "full",
        "documents_digest": None,
        "compile": "alone",
        "vector_store": None,
    }


def test_an_index_keyed_with_the_float_sum_fingerprint_still_opens_and_hits(smollm2, tmp_path):
    """Indexes built before the bits fingerprint keep answering from their stored KV: the manifest
    names no scheme, so it is reopened with the float-sum one it was keyed with."""
    from epic_rag.app.index import build_index, open_index

    from epic_rag import EpicEngine, KVStore, fingerprint

    from .conftest import SAMPLE_DOCS, SMOLLM2

    folder = tmp_path / "idx"
    old = EpicEngine(smollm2.model, smollm2.tokenizer, KVStore(folder / "kv"), fingerprint_scheme="float-sum")
    build_index(SAMPLE_DOCS, folder, model=SMOLLM2, engine=old, show_progress=False)
    written = json.loads((folder / MANIFEST).read_text())
    assert "fingerprint_scheme" not in written and written["fingerprint"] == fingerprint(smollm2.model, "float-sum")
    app = open_index(folder, max_new_tokens=4)
    assert (app.engine.fingerprint_scheme, app.engine.fingerprint) == ("float-sum", written["fingerprint"])
    _, handoff = app.ask("How long does the battery last?")
    call = handoff.first_call
    assert call.chunk_misses == 0 and call.chunk_hits == len(handoff.chunks) > 0
    (folder / MANIFEST).write_text(json.dumps({**written, "fingerprint": "ab" * 32}))
    with pytest.raises(ValueError, match=r"other weights .*made on the device that built it: open it there"):
        open_index(folder)

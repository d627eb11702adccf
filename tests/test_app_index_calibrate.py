"""`epic-rag index --calibrate`: the new index is calibrated at the end of indexing (SmolLM2)."""

from __future__ import annotations

import json
import re

import pytest

from epic_rag.policy_spec import CANDIDATES

from .test_cli_rag import MODEL, SAMPLES, epic_rag

pytestmark = pytest.mark.slow


def test_index_then_calibrate_records_the_recommended_policy(tmp_path):
    index = tmp_path / "calibrated-at-build"
    done = epic_rag(
        "index", str(SAMPLES), "--index", str(index), "--model", MODEL, "--calibrate", "--calibrate-samples", "2"
    )
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| ([^|]+?)(?: \(recommended\))? \|", done.stdout, re.MULTILINE)
    assert rows[1:] == list(CANDIDATES)  # the header, then every candidate in order
    best = re.search(r"^recommended: (\S+)", done.stdout, re.MULTILINE).group(1)
    manifest = json.loads((index / "epic_rag_index.json").read_text())
    assert manifest["policy"] == best and [s["policy"] for s in manifest["calibration"]["scores"]] == list(CANDIDATES)
    assert f"| {best} (recommended) |" in done.stdout

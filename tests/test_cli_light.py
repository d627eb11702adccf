"""The command line starts light: help and argument errors before torch or LlamaIndex load;
commands that need a missing extra or the benchmarks name the pip command."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoints, entry_points

import pytest

from epic_rag import cli
from epic_rag.policy_spec import parse_spec

PROBE = """
import json, sys
from epic_rag.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "transformers", "llama_index.core", "fastapi") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def run_cli(argv: list[str]) -> tuple[dict, str]:
    """Run `epic-rag argv` in a fresh interpreter; (exit code and heavy modules imported, stderr)."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["ask", "--help"], ["serve", "--help"], ["index", "--help"], ["chat", "--help"], ["info"]],
)
def test_help_and_info_import_neither_torch_nor_llama_index(argv):
    result, _ = run_cli(argv)
    assert result == {"code": 0, "heavy": []}


def test_a_bad_policy_is_refused_before_anything_heavy_loads():
    result, stderr = run_cli(["ask", "q?", "--index", "nowhere", "--policy", "attnlink:x"])
    assert result == {"code": 2, "heavy": []}
    assert "bad policy 'attnlink:x'" in stderr


def test_a_bad_compile_mode_is_refused_before_anything_heavy_loads():
    result, stderr = run_cli(["index", "docs", "--index", "idx", "--compile", "similar:0"])
    assert result == {"code": 2, "heavy": []}
    assert "compile mode 'similar:0': N must be at least 1" in stderr


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--max-batch", "0", "--max-batch: must be a whole number of at least 1, got '0'"),
        ("--max-batch", "two", "--max-batch: must be a whole number of at least 1, got 'two'"),
        ("--prefill-piece-ms", "-5", "--prefill-piece-ms: must be a positive number of milliseconds, got '-5'"),
    ],
)
def test_bad_batching_limits_are_refused_before_anything_heavy_loads(option, value, words):
    result, stderr = run_cli(["serve", "--index", "nowhere", option, value])
    assert result == {"code": 2, "heavy": []}
    assert words in stderr


def test_a_missing_extra_names_the_pip_command():
    with pytest.raises(cli.MissingExtraError, match=r"pip install 'epic-rag\[serve\]'") as err:
        cli.require_extra("serve", "serve", "json", "a_module_that_is_not_installed")
    assert "a_module_that_is_not_installed is not installed" in str(err.value)


def test_bench_without_the_benchmarks_says_how_to_install_them(monkeypatch, capsys):
    installed = entry_points(group="epic_rag.cli")
    monkeypatch.setattr(cli, "entry_points", lambda group: EntryPoints(e for e in installed if e.name != "bench"))
    assert cli.main(["bench", "ttft"]) == 2
    assert "pip install -e ./benchmarks" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, name, args, rescale",
    [
        ("attnlink", "attnlink", (16,), None),
        ("LegoLink:8", "attnlink", (8,), None),
        ("cacheblend:0.3:2", "cacheblend", (0.3, 2), None),
        ("guided:12:2:-1+-2", "guided", (12, 2, (-1, -2)), None),
        ("full_recompute", "full", (), None),
        ("guided:16+ape", "guided", (16, 4, (-1,)), (0.9, 1.0)),
        ("reuse+ape:0.5", "reuse", (), (0.5, 1.0)),
    ],
)
def test_the_policy_grammar_fills_in_defaults(spec, name, args, rescale):
    parsed = parse_spec(spec)
    assert (parsed.name, parsed.args, parsed.rescale) == (name, args, rescale)


@pytest.mark.parametrize("spec", ["attnlink:-1", "guided:16+ape:0", "full:3", "reuse+apex", "cacheblend:x", "blend"])
def test_the_policy_grammar_refuses_bad_specs(spec):
    with pytest.raises(ValueError, match="policy"):
        parse_spec(spec)

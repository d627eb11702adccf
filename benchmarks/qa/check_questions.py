"""Check a question file against its corpus: every evidence string must occur verbatim in the named file.

    python benchmarks/qa/check_questions.py --corpus examples/stdlib_docs \
        --questions benchmarks/qa/stdlib_questions.jsonl

Also checks the format (id, question, answers, hops, evidence; unique ids) and that a question with
``"hops": 2`` has evidence from two files, or from two places of one file more than 2,000 characters
apart. Prints one line per problem and exits 1 if there is any; prints a summary otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KEYS = ("id", "question", "answers", "hops", "evidence")
FAR_APART = 2000  # characters between two facts of one file for a 2-hop question


def check(corpus: Path, questions: Path) -> tuple[list[str], Counter]:
    """Problems found (empty if none) and a count of questions per hops."""
    problems: list[str] = []
    texts: dict[str, str] = {}
    hops: Counter = Counter()
    seen: set[str] = set()
    for lineno, line in enumerate(questions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{questions.name}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: not JSON ({err})")
            continue
        missing = [k for k in KEYS if k not in item]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        where = f"{where} ({item['id']})"
        if item["id"] in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(item["id"])
        if not item["question"].strip():
            problems.append(f"{where}: empty question")
        if not item["answers"] or not all(isinstance(a, str) and a.strip() for a in item["answers"]):
            problems.append(f"{where}: answers must be a non-empty list of non-empty strings")
        if item["hops"] not in (1, 2):
            problems.append(f"{where}: hops must be 1 or 2")
        hops[item["hops"]] += 1
        places: list[tuple[str, int]] = []
        for evidence in item["evidence"]:
            name, sep, fact = evidence.partition(": ")
            if not sep or not fact:
                problems.append(f"{where}: evidence not of the form '<file>: <text>': {evidence!r}")
                continue
            if name not in texts:
                path = corpus / name
                texts[name] = path.read_text(encoding="utf-8") if path.is_file() else ""
                if not path.is_file():
                    problems.append(f"{where}: no file {path}")
            at = texts[name].find(fact)
            if at < 0:
                problems.append(f"{where}: not in {name}: {fact!r}")
            places.append((name, at))
        if item["hops"] == 2 and not two_places(places):
            problems.append(f"{where}: hops 2 needs evidence from two files or two places {FAR_APART}+ chars apart")
    return problems, hops


def two_places(places: list[tuple[str, int]]) -> bool:
    """Whether the found evidence spans two files, or two offsets of one file far apart."""
    found = [(name, at) for name, at in places if at >= 0]
    if len({name for name, _ in found}) > 1:
        return True
    offsets = [at for _, at in found]
    return len(offsets) > 1 and max(offsets) - min(offsets) > FAR_APART


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="folder of the documents the evidence names")
    parser.add_argument("--questions", type=Path, required=True, help="jsonl question file")
    args = parser.parse_args()
    problems, hops = check(args.corpus, args.questions)
    for problem in problems:
        print(problem)
    counts = f"{sum(hops.values())} questions ({hops[1]} with hops 1, {hops[2]} with hops 2)"
    print(f"{args.questions}: {counts}, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Render the pydoc plain text of some standard-library modules into examples/stdlib_docs/.

    python3.11 benchmarks/qa/render_stdlib_docs.py [--out examples/stdlib_docs]

One ``<module>.txt`` per module. The rendering is pydoc's own, with three changes that make it
reproducible: the MODULE REFERENCE and FILE sections (a docs.python.org URL and the local path
of the source file) are dropped, object addresses (`` at 0x7f...``) are removed, and trailing
whitespace is stripped from every line. A module with a limit keeps only the first part of its
rendering, cut before a section, class or function entry. The licence of the text (the
LICENSE.txt of the Python install, the PSF License Version 2) is copied to _meta/LICENSE-PSF.txt,
beside the hand-written _meta/README.md, so that a glob for *.txt in the corpus folder finds only
the documents.
"""

from __future__ import annotations

import argparse
import importlib
import pydoc
import re
import shutil
import sys
import sysconfig
from pathlib import Path

# module: most characters kept (None: the whole rendering)
MODULES: dict[str, int | None] = {
    "base64": None,
    "bisect": None,
    "calendar": 9300,
    "colorsys": None,
    "copy": None,
    "difflib": 10800,
    "fnmatch": None,
    "getpass": None,
    "glob": None,
    "graphlib": None,
    "heapq": None,
    "hmac": None,
    "html": None,
    "keyword": None,
    "pprint": None,
    "sched": None,
    "secrets": None,
    "shlex": None,
    "statistics": 11400,
    "string": None,
    "textwrap": None,
    "uuid": None,
    "zlib": None,
}

PYTHON = (3, 11)
DROPPED_SECTIONS = {"MODULE REFERENCE", "FILE"}
ADDRESS = re.compile(r" at 0x[0-9a-f]+>")
# where a cut may go: before a section header, or before a class or function entry of a section
ENTRY = re.compile(r"^(\S|    \S)")


def render(name: str) -> str:
    """pydoc's plain-text page of module `name`, made reproducible (see the module docstring)."""
    text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    out, skipping = [], False
    for line in text.splitlines():
        if line and not line[0].isspace():  # a section header (or the title line)
            skipping = line.strip() in DROPPED_SECTIONS
        if not skipping:
            out.append(ADDRESS.sub(">", line).rstrip())
    return "\n".join(out).strip() + "\n"


def first_part(text: str, limit: int | None) -> str:
    """`text` if it fits in `limit` characters, else its longest head that ends before an entry."""
    if limit is None or len(text) <= limit:
        return text
    lines = text.splitlines(keepends=True)
    size, cut = 0, 0
    for i, line in enumerate(lines):
        if size > limit:
            break
        if i > 0 and ENTRY.match(line) and not lines[i - 1].strip():
            cut = i
        size += len(line)
    return "".join(lines[:cut]).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "examples" / "stdlib_docs")
    args = parser.parse_args()
    if sys.version_info[:2] != PYTHON:
        print(f"warning: this is Python {sys.version.split()[0]}; the corpus was made with 3.11", file=sys.stderr)
    (args.out / "_meta").mkdir(parents=True, exist_ok=True)
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    shutil.copyfile(licence, args.out / "_meta" / "LICENSE-PSF.txt")
    total = 0
    for name, limit in MODULES.items():
        text = first_part(render(name), limit)
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        total += len(text)
        print(f"{name:12s} {len(text):7d}")
    print(f"{'total':12s} {total:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

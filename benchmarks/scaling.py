"""Scaling benchmark: `python benchmarks/scaling.py --help` (same as `epic-rag bench scaling`)."""

import argparse
import sys

from epic_rag.bench.scaling import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

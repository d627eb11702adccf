"""Accuracy benchmark: `python benchmarks/accuracy.py --help` (same as `epic-rag bench accuracy`)."""

import argparse
import sys

from epic_rag.bench.accuracy import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

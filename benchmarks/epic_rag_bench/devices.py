"""--device and --dtype for every bench command, resolved the way `epic-rag` resolves them."""

from __future__ import annotations

import argparse

import torch

from epic_rag.cli import argparse_type
from epic_rag.devices import device_name, dtype_name, resolve_device, resolve_dtype

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # how results folders spell them


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=argparse_type(device_name),
        default=None,
        help="cpu, cuda, cuda:N or mps (default: the best present)",
    )
    parser.add_argument(
        "--dtype",
        type=argparse_type(lambda s: SHORT[dtype_name(s)]),
        default=None,
        help="fp32/float32, bf16/bfloat16 or fp16/float16 (default: bf16 on CUDA, fp32 elsewhere)",
    )


def resolve_device_arguments(args: argparse.Namespace) -> None:
    """args.device: the device to run on; args.dtype: its short dtype name (defaults filled in)."""
    args.device = resolve_device(args.device)
    args.dtype = SHORT[str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")]


def torch_dtype(args: argparse.Namespace) -> torch.dtype:
    return resolve_dtype(args.dtype, args.device)

"""The model options every command shares (``--model``, ``--device``, ``--dtype``) and the load
they describe."""

from __future__ import annotations

import argparse

from factpatch.models.loading import DEFAULT_MODEL, ModelHandle, default_device, load_model


def model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="bundled alias, HF folder or .gguf")
    parser.add_argument(
        "--device", default=None, help=f"torch device (default: {default_device()})"
    )
    parser.add_argument(
        "--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (fp32 on CPU)"
    )


def load_from_args(args: argparse.Namespace) -> ModelHandle:
    return load_model(args.model, device=args.device, dtype=args.dtype)

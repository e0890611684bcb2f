"""`granite-jax-convert SRC DST [--dtype ...] [--overwrite]`: HF checkpoint -> granite_jax checkpoint."""

from __future__ import annotations

import argparse
import sys

from granite_jax.cli.common import run_command
from granite_jax.convert.convert import DTYPES, convert_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="granite-jax-convert",
        description="Convert a Hugging Face Granite Speech checkpoint to granite_jax's format: the encoder, and for a "
        "whole 4.x model its audio projector and language model (with its tokenizer, chat template and "
        "generation config); Granite Speech 5 with its tokenizer.",
    )
    p.add_argument("src", help="HF checkpoint directory (config.json + safetensors) or hub id (org/name)")
    p.add_argument("dst", help="output directory (created atomically)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the stored parameters (default: float32 for the encoder and projector, the shipped dtype "
        "for the language model)",
    )
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="a whole 4.x model: keep only the encoder and projector (embeddings, CTC), not the language model",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        prov = convert_checkpoint(
            args.src,
            args.dst,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.quiet,
            language_model=not args.encoder_only,
        )
        if not args.quiet:
            what = "encoder + projector" if "source_projector_prefix" in prov else "encoder"
            if "language_model_dtype" in prov:
                what += f" + language model ({prov['language_model_dtype']})"
            print(f"wrote {args.dst} ({what}, {prov['dtype']}, from {prov['source']})")
        return 0

    return run_command("granite-jax-convert", run)


if __name__ == "__main__":
    sys.exit(main())

"""Write the synthetic digit-string corpus (espeak-ng; WAV files and NeMo manifests) used by notebooks/finetune.

Usage: python scripts/make_digits.py DST [--train 400] [--eval 80] [--heldout 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

from granite_jax.testing.speech import have_espeak, make_digit_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dst")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--eval", type=int, default=80)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not have_espeak():
        print("make_digits: espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng)", file=sys.stderr)
        return 1
    for split, path in make_digit_corpus(args.dst, args.train, args.eval, args.heldout, args.seed).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

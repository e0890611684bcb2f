"""`granite-jax`: one entry point for the commands (`demo`, `encode`, `transcribe`, `finetune`, `export`,
`convert`), each in its own module beside this one."""

from __future__ import annotations

import argparse
import sys

from granite_jax.cli import demo, encode, finetune, transcribe
from granite_jax.cli.common import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="granite-jax", description="Granite Speech encoder in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="encode a bundled speech clip with a random checkpoint at the real architecture; compare with torch",
    )
    d.add_argument(
        "--model",
        choices=("granite-speech", "speech5"),
        default="granite-speech",
        help="granite-speech: the 4.x encoder + projector; speech5: Granite Speech 5 TurboCTC (470M)",
    )
    d.add_argument("--layers", type=int, default=16, help="encoder depth (16 = the released models')")
    d.add_argument("--clip", default="fox", help="a bundled clip (fox, numbers, report) or an audio file")
    d.add_argument("--seconds", type=float, default=None, help="repeat or cut the clip to this length")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--runs", type=int, default=3, help="timed runs after the first call")
    e = sub.add_parser("encode", help="encode audio files: hidden states, projector embeddings or CTC text")
    encode.build_parser(e)
    t = sub.add_parser("transcribe", help="greedy CTC text of audio files, with word and token times")
    transcribe.build_parser(t)

    f = sub.add_parser("finetune", help="fine-tune (or train) the encoder with optax on a NeMo manifest")
    finetune.build_finetune_parser(f)
    x = sub.add_parser("export", help="write a granite_jax checkpoint back as a Hugging Face directory")
    finetune.build_export_parser(x)
    c = sub.add_parser("convert", help="same as granite-jax-convert", add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "convert":
        from granite_jax.convert.cli import main as convert_main

        return convert_main(args.args)
    if args.command == "encode":
        return encode.execute(args)
    if args.command == "transcribe":
        return transcribe.execute(args)
    if args.command == "finetune":
        return run_command("granite-jax finetune", lambda: finetune.run_finetune(args))
    if args.command == "export":
        return run_command("granite-jax export", lambda: finetune.run_export(args))
    if args.layers < 1 or (args.seconds is not None and not args.seconds > 0) or args.runs < 1 or args.batch < 1:
        p.error("--layers, --seconds, --runs and --batch must be positive")
    run = demo.demo5 if args.model == "speech5" else demo.demo
    return run_command("granite-jax demo", lambda: run(args.layers, args.clip, args.seconds, args.runs, args.batch))


if __name__ == "__main__":
    sys.exit(main())

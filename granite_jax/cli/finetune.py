"""`granite-jax finetune CKPT --train MANIFEST [--eval MANIFEST] --out DST` and `granite-jax export CKPT DST`."""

from __future__ import annotations

import argparse
import json
import sys

from granite_jax.cli.common import run_command


def build_finetune_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from granite_jax.train.lora import SPEECH5_TARGETS, TARGETS

    p.add_argument("checkpoint", help="granite_jax checkpoint or HF checkpoint directory to start from")
    p.add_argument("--train", required=True, metavar="MANIFEST", help="NeMo JSON-lines manifest of the training set")
    p.add_argument("--eval", metavar="MANIFEST", help="manifest of a held-out set: CER and WER reported")
    p.add_argument("--out", required=True, metavar="DST", help="where the final model is written (atomically)")
    p.add_argument("--state-dir", help="orbax training state and metrics.jsonl (default DST.train)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="utterances per step (a multiple of the devices)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="after the warmup")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clipping; 0 turns it off")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer update")
    p.add_argument("--mid-weight", type=float, default=0.0, help="weight of the intermediate CTC loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze", action="append", default=[], metavar="PATTERN", help="freeze matching parameters")
    p.add_argument("--train-only", action="append", metavar="PATTERN", help="train only matching parameters")
    p.add_argument("--frozen-batch-norm", action="store_true", help="BatchNorm on its running statistics")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument(
        "--lora-targets",
        nargs="+",
        choices=TARGETS + SPEECH5_TARGETS,
        help="default: every attention and feed-forward projection",
    )
    p.add_argument("--bf16", action="store_true", help="compute in bf16 over fp32 master weights")
    p.add_argument("--remat", choices=("auto", "on", "off"), default="auto", help="rematerialise each block")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    p.add_argument("--save-every", type=int, default=100, help="save the training state every N steps")
    p.add_argument("--keep", type=int, default=3, help="training states kept")
    p.add_argument("--resume", action="store_true", help="continue the run whose state is in --state-dir")
    p.add_argument("--from-scratch", action="store_true", help="CKPT's configuration, randomly initialised (--seed)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is a granite_jax checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_finetune(args: argparse.Namespace) -> int:
    from granite_jax.train.finetune import RunConfig, finetune
    from granite_jax.train.step import TrainConfig

    train = TrainConfig(
        optimizer=args.optimizer,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        total_steps=args.steps if args.schedule == "cosine" else None,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip or None,
        accumulate=args.accumulate,
        mid_weight=args.mid_weight,
        remat={"auto": "auto", "on": True, "off": False}[args.remat],
        compute_dtype="bfloat16" if args.bf16 else "float32",
        freeze=tuple(args.freeze),
        train_only=tuple(args.train_only) if args.train_only else None,
        batch_norm="frozen" if args.frozen_batch_norm else "train",
    )
    run = RunConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep=args.keep,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None,
    )
    summary = finetune(
        args.checkpoint,
        args.train,
        args.out,
        eval_manifest=args.eval,
        train=train,
        run=run,
        resume=args.resume,
        overwrite=args.overwrite,
        state_dir=args.state_dir,
        progress=not args.quiet,
        from_scratch=args.from_scratch,
    )
    if not args.quiet:
        print(json.dumps(summary, indent=None), file=sys.stderr)
    return 0


def build_export_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("checkpoint", help="granite_jax checkpoint (from granite-jax-convert or finetune)")
    p.add_argument("dst", help="the Hugging Face directory to write")
    p.add_argument("--base", help="the original full HF checkpoint: a whole GraniteSpeech(Plus) model is written")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the base's, else float32")
    p.add_argument("--overwrite", action="store_true")
    return p


def run_export(args: argparse.Namespace) -> int:
    import granite_jax
    from granite_jax.checkpoint.export import export_hf

    model = granite_jax.load(args.checkpoint)
    dst = export_hf(model, args.dst, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst}", file=sys.stderr)
    return 0


def finetune_main(argv: list[str] | None = None) -> int:
    args = build_finetune_parser(argparse.ArgumentParser(prog="granite-jax finetune")).parse_args(argv)
    return run_command("granite-jax finetune", lambda: run_finetune(args))


def export_main(argv: list[str] | None = None) -> int:
    args = build_export_parser(argparse.ArgumentParser(prog="granite-jax export")).parse_args(argv)
    return run_command("granite-jax export", lambda: run_export(args))

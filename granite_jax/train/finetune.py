"""`granite-jax finetune`: a training loop people can use, resumable exactly.

Training state (parameters, optimizer state, step) is saved with orbax-checkpoint every `save_every` steps,
keeping the last few; the batch of each step and its dropout key are pure functions of (seed, step), so a
run killed at any point and resumed gives the weights an uninterrupted run gives. The final model is
written atomically in granite_jax's checkpoint format (LoRA adapters merged), loadable by `granite_jax.load`
and exportable to Hugging Face (`granite-jax export`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.checkpoint import store as checkpoint
from granite_jax.frontend.audio import load_audio
from granite_jax.frontend.config import FeatureConfig
from granite_jax.models import speech5
from granite_jax.models.conformer import GraniteSpeechEncoder, params_of
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.projector import projector_params_of
from granite_jax.text.tokenizer import TOKENIZER_FILES
from granite_jax.train import data, lora
from granite_jax.train.loss import text_to_labels
from granite_jax.train.step import TrainConfig, Trainer

STATE_SUFFIX = ".train"  # DST.train/: orbax checkpoints and metrics.jsonl of the run writing DST


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop around `TrainConfig`: how long, how batched, what is saved and evaluated."""

    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 0  # 0: only at the end (when there is an eval manifest)
    save_every: int = 100
    keep: int = 3
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None  # None: every projection the family has (lora.targets_of)
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "keep", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("eval_every", "lora_rank", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


def labeller(runner):
    """Texts -> CTC labels for this checkpoint: the tokenizer's BPE ids (Speech 5), or characters (4.x)."""
    if runner.tokenizer is not None:
        return runner.tokenizer.labels
    return lambda texts: text_to_labels(texts, runner.config.output_dim)


@functools.partial(nnx.jit, static_argnums=(3,))
def _greedy_ids(model, features, lengths, family):
    valid = jnp.arange(features.shape[1])[None, :] < lengths[:, None]
    out = family.encode(model, features, valid, 8)
    return jnp.argmax(family.ctc_logits(model, out.last_hidden_state), axis=-1)


def evaluate(model, runner, utterances: Sequence[data.Utterance], batch_size: int = 8) -> dict[str, Any]:
    """Greedy CTC text of every utterance (the model in eval mode; `runner` gives the front end and the
    buckets), and CER / WER against the manifest's texts (jiwer)."""
    import jiwer

    refs, hyps = [], []
    sr = runner.feature_config.sampling_rate
    for start in range(0, len(utterances), batch_size):
        chunk = utterances[start : start + batch_size]
        feats, lengths = runner.extract_features([load_audio(u.audio_filepath, sr) for u in chunk], sr)
        t = feats.shape[1]
        feats = jnp.pad(feats, ((0, 0), (0, runner.bucket_frames(t) - t), (0, 0)))
        ids = np.asarray(_greedy_ids(model, feats, jnp.asarray(lengths), runner.family))
        hyps += runner.ctc_decode(ids, runner.output_lengths(lengths))
        refs += [u.text for u in chunk]
    scored = [(r, h if h.strip() else " ") for r, h in zip(refs, hyps, strict=True) if r.strip()]
    cer = jiwer.cer([r for r, _ in scored], [h for _, h in scored]) if scored else 0.0
    wer = jiwer.wer([r for r, _ in scored], [h for _, h in scored]) if scored else 0.0
    return {"cer": float(cer), "wer": float(wer), "hypotheses": hyps}


class _Metrics:
    """metrics.jsonl: one JSON object per line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        keep = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        break
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def finetune(
    ckpt: str,
    train_manifest: str,
    out: str,
    *,
    eval_manifest: str | None = None,
    train: TrainConfig = TrainConfig(),
    run: RunConfig = RunConfig(),
    resume: bool = False,
    overwrite: bool = False,
    state_dir: str | None = None,
    progress: bool = True,
    devices: Any = None,
    from_scratch: bool = False,
) -> dict[str, Any]:
    """Fine-tune the encoder of `ckpt` on `train_manifest` (or, `from_scratch`, train one of its configuration
    from a random initialisation seeded by `run.seed`); write the final model to `out`.

    Returns a summary (final step, last loss, eval CER/WER when `eval_manifest` is given).
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    import granite_jax

    out = os.path.abspath(out)
    checkpoint.check_destination(out, overwrite)
    state_dir = os.path.abspath(state_dir or out + STATE_SUFFIX)
    if os.path.exists(state_dir) and not resume and os.listdir(state_dir):
        raise FileExistsError(f"{state_dir} holds an earlier run's state; pass --resume to continue it")
    train_set = data.read_manifest(train_manifest)
    eval_set = data.read_manifest(eval_manifest) if eval_manifest else None
    runner = granite_jax.load(ckpt, devices=devices)
    model = runner.model
    if from_scratch:  # new values in the same Variables (the runner stays bound to them)
        nnx.update(model, nnx.state(type(model)(model.config, rngs=nnx.Rngs(run.seed))))
    labels = labeller(runner)
    for u in train_set:  # every text must be labellable before the first step
        labels([u.text])
    if run.lora_rank:
        lora.add_lora(model, run.lora_rank, run.lora_alpha, run.lora_targets, seed=run.seed)
    trainer = Trainer(model, train, devices=devices, wrt=nnx.LoRAParam if run.lora_rank else nnx.Param)
    schedule = data.BatchSchedule(train_set, run.batch_size, run.seed)
    fc = runner.feature_config

    def features(waves):
        return runner.extract_features(waves, fc.sampling_rate)

    os.makedirs(state_dir, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=run.keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )
    manager = ocp.CheckpointManager(state_dir, options=options)
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        target = {
            "model": nnx.to_pure_dict(nnx.state(model)),
            "optimizer": nnx.to_pure_dict(nnx.state(trainer.optimizer)),
        }
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
        for node, key in ((model, "model"), (trainer.optimizer, "optimizer")):
            state = nnx.state(node)
            nnx.replace_by_pure_dict(state, restored[key])
            nnx.update(node, state)
    metrics = _Metrics(os.path.join(state_dir, "metrics.jsonl"), start if resume else None)
    base_key = jax.random.key(run.seed)
    bar = tqdm(total=run.steps, initial=start, unit="step", desc="training", disable=not progress)
    last: dict[str, float] = {}
    t_audio, t0 = 0.0, time.perf_counter()
    summary: dict[str, Any] = {}
    for step in range(start, run.steps):
        utts = [train_set[i] for i in schedule[step]]
        batch = data.make_batch(utts, lambda p: load_audio(p, fc.sampling_rate), features, labels, runner.bucket_frames)
        last = trainer.step(batch, jax.random.fold_in(base_key, step))
        t_audio += data.seconds(utts)
        record = {"step": step + 1, **{k: round(v, 6) for k, v in last.items()}, "audio_s": round(t_audio, 3)}
        done = step + 1
        if eval_set is not None and run.eval_every and done % run.eval_every == 0 and done < run.steps:
            model.eval()
            ev = evaluate(model, runner, eval_set, run.eval_batch_size)
            trainer.train_mode()
            record.update(eval_cer=ev["cer"], eval_wer=ev["wer"])
        metrics.write(record)
        bar.set_postfix(
            loss=f"{last['loss']:.3f}",
            lr=f"{last['lr']:.2e}",
            audio_s_per_s=f"{t_audio / (time.perf_counter() - t0):.1f}",
        )
        bar.update(1)
        if done % run.save_every == 0 or done == run.steps:
            state = {
                "model": nnx.to_pure_dict(nnx.state(model)),
                "optimizer": nnx.to_pure_dict(nnx.state(trainer.optimizer)),
            }
            manager.save(done, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    bar.close()
    manager.close()

    lora.merge_lora(model)
    model.eval()
    if eval_set is not None:
        ev = evaluate(model, runner, eval_set, run.eval_batch_size)
        summary.update(eval_cer=ev["cer"], eval_wer=ev["wer"])
        metrics.write({"step": run.steps, "eval_cer": ev["cer"], "eval_wer": ev["wer"]})
    provenance = dict(runner.provenance)
    provenance.update(
        finetuned_from=os.path.abspath(ckpt) if os.path.exists(ckpt) else ckpt,
        train_manifest=os.path.abspath(train_manifest),
        steps=run.steps,
        train_config=json.dumps(dataclasses.asdict(train)),
        run_config=json.dumps(dataclasses.asdict(run)),
        dtype="float32",
    )
    flat = speech5.params_of(model) if isinstance(model, speech5.GraniteSpeech5Encoder) else params_of(model)
    params = {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in flat.items()}
    projector = runner.projector
    checkpoint.save(
        out,
        model.config,
        params,
        provenance,
        overwrite=overwrite,
        projector_config=projector.config if projector is not None else None,
        projector_params=projector_params_of(projector) if projector is not None else None,
        feature_config=fc,
        files={
            n: os.path.join(runner.tokenizer.source, n)
            for n in TOKENIZER_FILES
            if runner.tokenizer is not None and os.path.isfile(os.path.join(runner.tokenizer.source, n))
        },
    )
    summary.update(step=run.steps, loss=last.get("loss"), out=out, state_dir=state_dir)
    return summary


def new_checkpoint(
    config: EncoderConfig,
    dst: str,
    *,
    seed: int = 0,
    feature_config: FeatureConfig = FeatureConfig(),
    overwrite: bool = False,
) -> str:
    """A granite_jax checkpoint of a randomly initialised encoder (`seed`), to train from scratch."""
    model = GraniteSpeechEncoder(config, rngs=nnx.Rngs(seed))
    provenance = {"source": f"random initialisation (seed {seed})", "dtype": "float32"}
    checkpoint.save(dst, config, params_of(model), provenance, overwrite=overwrite, feature_config=feature_config)
    return os.path.abspath(dst)


__all__ = ["STATE_SUFFIX", "RunConfig", "evaluate", "finetune", "new_checkpoint"]

"""The training loop people use: it learns, its manifests name their bad lines, a killed run resumes exactly,
and the batch splits over devices without changing the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import granite_jax
from granite_jax.data import CLIPS, clip_path
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.train import RunConfig, TrainConfig, finetune, new_checkpoint
from granite_jax.train.data import ManifestError, read_manifest

TEXTS = {
    "fox": "The quick brown fox jumps over the lazy dog.",
    "numbers": "Flight 237 leaves gate 18 at 9:45.",
    "report": "Please send the quarterly report to Maria before Friday afternoon.",
}
# A small character-level encoder (ids are chr codes, as the 4.x heads): it memorises the clips quickly.
SMALL = EncoderConfig(
    input_dim=160,
    num_layers=2,
    hidden_dim=96,
    feedforward_mult=2,
    num_heads=4,
    dim_head=24,
    output_dim=128,
    context_size=32,
    max_pos_emb=64,
    dropout=0.0,
    conv_kernel_size=7,
)


def _manifest(path, names=CLIPS, relative=True) -> str:
    with open(path, "w") as f:
        for name in names:
            audio = clip_path(name)
            if relative:
                audio = os.path.relpath(audio, os.path.dirname(path))
            f.write(json.dumps({"audio_filepath": audio, "text": TEXTS[name]}) + "\n")
    return str(path)


def test_it_learns_the_bundled_clips_from_scratch(tmp_path):
    """A tiny encoder from random initialisation, trained until greedy CTC returns the transcripts exactly."""
    new_checkpoint(SMALL, tmp_path / "init", seed=0)
    manifest = _manifest(tmp_path / "train.json")
    train = TrainConfig(learning_rate=5e-3, warmup_steps=8, total_steps=90, grad_clip=1.0)
    run = RunConfig(steps=90, batch_size=3, save_every=45, seed=0)
    summary = finetune(
        str(tmp_path / "init"),
        manifest,
        str(tmp_path / "out"),
        eval_manifest=manifest,
        train=train,
        run=run,
        progress=False,
    )
    assert summary["eval_cer"] == 0.0 and summary["eval_wer"] == 0.0, summary
    model = granite_jax.load(tmp_path / "out")
    res = model.encode([granite_jax.load_audio(clip_path(c)) for c in CLIPS])
    assert model.ctc_greedy(res.hidden_states, res.lengths) == [TEXTS[c] for c in CLIPS]
    lines = [json.loads(x) for x in (tmp_path / "out.train" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[-1]["eval_cer"] == 0.0 and lines[-2]["loss"] < lines[0]["loss"] / 10


def test_manifest_errors_name_their_lines(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    lines = [
        json.dumps({"audio_filepath": clip_path("fox"), "text": "ok", "duration": 3.2}),
        "{not json",
        json.dumps({"text": "no audio"}),
        json.dumps({"audio_filepath": "missing.wav", "text": "x"}),
        json.dumps({"audio_filepath": clip_path("fox"), "text": 7}),
        json.dumps({"audio_filepath": clip_path("fox"), "text": "x", "duration": -1}),
        "[1, 2]",
    ]
    (tmp_path / "m.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path / "m.json")
    msg = str(e.value)
    for n, what in [
        (2, "not JSON"),
        (3, "no audio_filepath"),
        (4, "audio file not found"),
        (5, "no text"),
        (6, "duration"),
        (7, "not a JSON object"),
    ]:
        assert f"line {n}: {what}" in msg, msg
    assert "line 1" not in msg
    good = read_manifest(_manifest(tmp_path / "ok.json"))
    assert [u.text for u in good] == [TEXTS[c] for c in CLIPS] and all(u.duration > 2 for u in good)


def test_finetune_cli_refuses_unlabellable_text_before_training(tmp_path, capsys):
    from granite_jax.cli.main import main

    new_checkpoint(SMALL, tmp_path / "init")
    with open(tmp_path / "m.json", "w") as f:
        f.write(json.dumps({"audio_filepath": clip_path("fox"), "text": "naïve café"}) + "\n")
    rc = main(
        [
            "finetune",
            str(tmp_path / "init"),
            "--train",
            str(tmp_path / "m.json"),
            "--out",
            str(tmp_path / "o"),
            "--batch-size",
            "1",
            "--steps",
            "2",
            "--quiet",
        ]
    )
    assert rc == 1 and "'ï' (239)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


_RUN = """
import sys
from granite_jax.cli.main import main
sys.exit(main(["finetune", {init!r}, "--train", {manifest!r}, "--out", {out!r}, "--steps", "8", "--batch-size", "2",
               "--save-every", "2", "--lr", "2e-3", "--seed", "3", "--mid-weight", "0.2", "--quiet"] + {extra!r}))
"""


def _finetune(tmp_path, out: str, extra=(), kill_after_state: int | None = None) -> int:
    code = _RUN.format(init=str(tmp_path / "init"), manifest=str(tmp_path / "train.json"), out=out, extra=list(extra))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE, text=True)
    if kill_after_state is not None:
        state = out + ".train"
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(state, str(kill_after_state))):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after the step-4 state is saved, then --resume: the weights of an uninterrupted run, exactly."""
    from granite_jax.testing import TINY

    cfg = TINY.__class__(**{**TINY.__dict__, "input_dim": 160, "output_dim": 128, "num_layers": 2, "dropout": 0.1})
    new_checkpoint(cfg, tmp_path / "init", seed=1)
    _manifest(tmp_path / "train.json")
    assert _finetune(tmp_path, str(tmp_path / "straight")) == 0
    assert _finetune(tmp_path, str(tmp_path / "killed"), kill_after_state=4) == -signal.SIGKILL
    assert not (tmp_path / "killed").exists()
    assert _finetune(tmp_path, str(tmp_path / "killed"), extra=["--resume"]) == 0
    a = granite_jax.checkpoint.store.load(tmp_path / "straight").params
    b = granite_jax.checkpoint.store.load(tmp_path / "killed").params
    assert set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed.train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == list(range(1, 9))  # the killed run's later lines were dropped
    assert sorted(os.listdir(tmp_path / "killed.train"))[:3] == ["4", "6", "8"]  # the last 3 states are kept


_PARALLEL = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
jax.config.update("jax_default_matmul_precision", "highest")
from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.testing import TINY
from granite_jax.train import Trainer, TrainConfig
cfg = dataclasses.replace(TINY, num_layers=3, dropout=0.0)
rng = np.random.default_rng(0)
batch = dict(features=rng.standard_normal((8, 30, cfg.input_dim)).astype(np.float32),
             lengths=np.array([30, 25, 20, 30, 11, 29, 17, 30], np.int32),
             labels=rng.integers(1, cfg.output_dim, (8, 6)).astype(np.int32),
             label_lengths=np.array([6, 4, 5, 2, 3, 6, 1, 4], np.int32))
out = {}
for name, devices, fsdp in [("one", 1, False), ("four", 4, False), ("fsdp", 4, True)]:
    m = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0))
    tr = Trainer(m, TrainConfig(learning_rate=1e-2, eps=1e-3, mid_weight=0.3), devices=devices, fsdp=fsdp)
    losses = [tr.step(batch)["loss"] for _ in range(3)]
    leaves = jax.tree.leaves(nnx.state(m))
    out[name] = {"losses": losses, "devices": len(leaves[0].sharding.device_set),
                 "state": [np.asarray(x, np.float64).tolist() for x in leaves]}
print(json.dumps(out))
"""


def test_data_parallel_equals_one_device():
    """4 simulated CPU devices, parameters replicated or FSDP-sharded: the same losses and weights."""
    proc = subprocess.run([sys.executable, "-c", _PARALLEL], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["four"]["devices"] == 4
    for name in ("four", "fsdp"):
        np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=1e-5)
        # Adam divides each update by its own running RMS: with the default eps a weight whose gradient is near
        # zero moves by up to the learning rate whatever the gradient's size, so the devices' summation order
        # (gradients equal to ~1e-7) showed there at 1e-4. eps=1e-3 bounds that amplification (lr / eps = 10),
        # so the weights must agree closely everywhere.
        for a, b in zip(out[name]["state"], out["one"]["state"], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

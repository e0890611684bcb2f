"""A batch split over several devices (`devices=`) gives what one device gives.

Four CPU devices are simulated with XLA_FLAGS=--xla_force_host_platform_device_count=4, which must be set
before jax is imported: one subprocess runs this file as a script, does every check, and prints JSON that
the tests below read. The model is a random tiny encoder + projector saved as a granite_jax checkpoint (no
torch needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from granite_jax.testing import TINY

NUM_DEVICES = 4
CFG = dataclasses.replace(TINY, input_dim=160, num_layers=2, cat_hidden_layers=(0,))  # 160: log-mel width
SR = 16000


def _checks(tmp: str) -> dict:
    """Runs in the subprocess, with NUM_DEVICES simulated devices."""
    import jax
    from flax import nnx

    import granite_jax
    from granite_jax.checkpoint import store as checkpoint
    from granite_jax.models.conformer import GraniteSpeechEncoder, params_of
    from granite_jax.models.projector import GraniteSpeechProjector, projector_params_of
    from granite_jax.models.projector_config import ProjectorConfig
    from granite_jax.runtime.runner import Runner

    out: dict = {"local_devices": len(jax.local_devices())}
    pcfg = ProjectorConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                           encoder_hidden_size=CFG.output_width, llm_hidden_size=10, window_size=6,
                           downsample_rate=3)  # fmt: skip
    enc = GraniteSpeechEncoder(CFG, rngs=nnx.Rngs(1))
    proj = GraniteSpeechProjector(pcfg, rngs=nnx.Rngs(2))
    path = os.path.join(tmp, "gj")
    checkpoint.save(path, CFG, params_of(enc), {"source": "test_sharding"}, projector_config=pcfg,
                    projector_params=projector_params_of(proj))  # fmt: skip
    many = granite_jax.load(path)  # all local devices
    one = granite_jax.load(path, devices=1)
    out["devices"] = {"many": len(many.devices), "one": len(one.devices)}
    out["params_devices"] = len(many.model.input_linear.kernel.get_value().sharding.device_set)

    def err(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return {
            "max_abs": float(np.abs(a - b).max()),
            "close": bool(a.shape == b.shape and np.allclose(a, b, atol=1e-5)),
        }

    def where(x):
        s = x.sharding
        return {
            "devices": len(s.device_set),
            "spec": [str(a) for a in getattr(s, "spec", ())],
            "replicated": s.is_fully_replicated,
        }

    rng = np.random.default_rng(0)
    t = 21
    for b in (3, 5, 8):
        r = out[f"batch{b}"] = {}
        feats = rng.standard_normal((b, t, CFG.input_dim)).astype(np.float32)
        lens = rng.integers(1, t + 1, b)
        lens[0] = t
        h_many, h_one = many.encode_features(feats, lens), one.encode_features(feats, lens)
        r["encode_features"] = err(h_many, h_one)
        r["encode_features_where"] = where(h_many)
        emb_many, counts_many = many.audio_embeddings(h_many, lens)
        emb_one, counts_one = one.audio_embeddings(h_one, lens)
        r["audio_embeddings"] = err(emb_many, emb_one)
        r["audio_embeddings_counts_equal"] = counts_many.tolist() == counts_one.tolist()
        if b == 8:
            continue  # only where the result lives; 3 and 5 check the values
        waves = [(0.1 * rng.standard_normal(int(n))).astype(np.float32) for n in rng.integers(300, 6500, b)]
        modes = ("per_utterance", "hf") if b == 5 else ("per_utterance",)
        for mode in modes:
            a, c = many.encode(waves, batch_mode=mode), one.encode(waves, batch_mode=mode)
            r[f"encode_{mode}"] = {
                "features": err(a.features, c.features),
                "hidden_states": err(a.hidden_states, c.hidden_states),
                "audio_embeddings": err(a.audio_embeddings, c.audio_embeddings),
                "lengths_equal": a.lengths.tolist() == c.lengths.tolist()
                and a.embedding_counts.tolist() == c.embedding_counts.tolist(),
                "where": where(a.hidden_states),
            }

    # 3 and 4 rows both run as 4 rows: no new compilation
    before = many.num_compilations
    many.encode_features(rng.standard_normal((4, t, CFG.input_dim)).astype(np.float32))
    out["compilations_for_4_after_3"] = many.num_compilations - before

    # an explicit list of devices; a 2-D input (one row, three dummy rows)
    two = Runner(GraniteSpeechEncoder(CFG, rngs=nnx.Rngs(1)), devices=jax.local_devices()[1:3])
    row = rng.standard_normal((t, CFG.input_dim)).astype(np.float32)
    out["two"] = {
        "devices": [d.id for d in two.devices],
        "encode_features": err(two.encode_features(row[None]), one.encode_features(row[None])),
        "squeezed": err(many.encode_features(row), one.encode_features(row)),
    }

    d0 = jax.local_devices()[0]
    bad = {"0": 0, "5": NUM_DEVICES + 1, "-1": -1, "True": True, "2.5": 2.5, "'cpu'": "cpu", "[]": [],
           "[d0, d0]": [d0, d0], "['cpu:0']": ["cpu:0"], "[d0, 1]": [d0, 1]}  # fmt: skip
    out["bad_devices"] = {}
    for name, spec in bad.items():
        try:
            Runner(GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0)), devices=spec)
            out["bad_devices"][name] = None
        except ValueError as e:
            out["bad_devices"][name] = str(e)
    try:
        granite_jax.load(path, devices=0)
        out["bad_devices"]["load(devices=0)"] = None
    except ValueError as e:
        out["bad_devices"]["load(devices=0)"] = str(e)
    return out


def _generate_checks(path: str) -> dict:
    """Runs in the subprocess: speech to text from a whole 4.x checkpoint on all devices and on one (without
    torch or transformers, which generation must not need)."""
    sys.modules["torch"] = sys.modules["transformers"] = None
    import granite_jax

    many, one = granite_jax.load(path), granite_jax.load(path, devices=1)
    rng = np.random.default_rng(5)
    out: dict = {"devices": [len(many.devices), len(one.devices)]}
    for b in (3, 5):  # dummy rows on 4 devices
        waves = [(0.1 * rng.standard_normal(int(n))).astype(np.float32) for n in rng.integers(1500, 9000, b)]
        for beams in (1, 2):
            a = many.generate(waves, max_new_tokens=8, num_beams=beams)
            z = one.generate(waves, max_new_tokens=8, num_beams=beams)
            out[f"batch{b}_beams{beams}"] = {
                "ids_equal": [list(x) == list(y) for x, y in zip(a.token_ids, z.token_ids, strict=True)],
                "lengths": [len(x) for x in z.token_ids],
            }
    return out


def _in_subprocess(*args: str) -> dict:
    """Run this file as a script with NUM_DEVICES simulated CPU devices; its JSON result."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"  # the flag simulates CPU devices; keep a GPU out of it
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """`_checks` in one subprocess with NUM_DEVICES simulated CPU devices."""
    return _in_subprocess(os.fspath(tmp_path_factory.mktemp("sharding")))


def test_sees_all_simulated_devices(report):
    assert report["local_devices"] == NUM_DEVICES
    assert report["devices"] == {"many": NUM_DEVICES, "one": 1}
    assert report["params_devices"] == NUM_DEVICES  # replicated


@pytest.mark.parametrize("b", [3, 5, 8])
def test_encode_features_and_projector_equal_one_device(report, b):
    r = report[f"batch{b}"]
    assert r["encode_features"]["close"], r["encode_features"]
    assert r["audio_embeddings"]["close"], r["audio_embeddings"]
    assert r["audio_embeddings_counts_equal"]


@pytest.mark.parametrize("b, mode", [(3, "per_utterance"), (5, "per_utterance"), (5, "hf")])
def test_encode_equals_one_device(report, b, mode):
    r = report[f"batch{b}"][f"encode_{mode}"]
    for key in ("features", "hidden_states", "audio_embeddings"):
        assert r[key]["close"], (key, r[key])
    assert r["lengths_equal"]


def test_outputs_live_on_all_devices(report):
    # a multiple of the device count stays split by rows ...
    assert report["batch8"]["encode_features_where"] == {
        "devices": 4,
        "spec": ["batch"],
        "replicated": False,
    }
    # ... other sizes lose their dummy rows, which gathers them (a jax.Array cannot split 3 rows 4 ways)
    for b in (3, 5):
        assert report[f"batch{b}"]["encode_features_where"]["devices"] == NUM_DEVICES
        assert report[f"batch{b}"]["encode_per_utterance"]["where"]["devices"] == NUM_DEVICES


def test_dummy_rows_share_a_compilation(report):
    assert report["compilations_for_4_after_3"] == 0


def test_explicit_device_list_and_single_row(report):
    r = report["two"]
    assert r["devices"] == [1, 2]
    assert r["encode_features"]["close"] and r["squeezed"]["close"], r


def test_bad_devices_raise_value_error(report):
    raised = report["bad_devices"]
    assert all(raised.values()), {k: v for k, v in raised.items() if not v}
    assert "local device" in raised["5"] and "local device" in raised["0"]
    assert "distinct" in raised["[d0, d0]"]
    assert "jax devices" in raised["['cpu:0']"] and "jax devices" in raised["[d0, 1]"]
    assert "empty" in raised["[]"]


# -- in this process (one device, or whatever this process has) ---------------------------------------
def test_bad_devices_in_process():
    import jax
    from flax import nnx

    from granite_jax.models.conformer import GraniteSpeechEncoder
    from granite_jax.runtime.runner import Runner

    n = len(jax.local_devices())
    model = GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0))
    for spec, match in [(n + 1, "local device"), (0, "local device"), ([], "empty"), ("cpu", "device count")]:
        with pytest.raises(ValueError, match=match):
            Runner(model, devices=spec)
    enc = Runner(model, devices=jax.local_devices()[:1])
    assert enc.padded_batch(3) == 3 and len(enc.devices) == 1


@pytest.mark.torch
def test_generate_equals_one_device(tmp_path):
    """Greedy and beam search with the batch split over the devices (dummy rows included) give one device's ids."""
    from granite_jax.testing import convert_cli
    from granite_jax.testing.hf_llm import make_hf_speech_checkpoint, train_llm_tokenizer

    projector = dict(window_size=6, downsample_rate=3)
    make_hf_speech_checkpoint(CFG, tmp_path / "hf", train_llm_tokenizer(), projector=projector)
    convert_cli(tmp_path / "hf", tmp_path / "gj")
    r = _in_subprocess("generate", os.fspath(tmp_path / "gj"))
    assert r.pop("devices") == [NUM_DEVICES, 1]
    for case, got in r.items():
        assert all(got["ids_equal"]), (case, got)
    print("generated lengths per case:", {k: v["lengths"] for k, v in r.items()})


if __name__ == "__main__":
    if sys.argv[1] == "generate":
        print(json.dumps(_generate_checks(sys.argv[2])))
    else:
        print(json.dumps(_checks(sys.argv[1])))

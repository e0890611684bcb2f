"""Training against torch: the CTC loss, the gradient of every parameter, BatchNorm's running statistics, one
SGD / AdamW step; dropout, remat, bf16, freezing, LoRA."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import granite_jax
from granite_jax.checkpoint.params import variables_of
from granite_jax.convert import flax_to_hf
from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.models.conformer_config import PRODUCTION
from granite_jax.testing import TINY, convert_cli
from granite_jax.testing.hf import hf_ctc_loss, make_hf_checkpoint
from granite_jax.train import ctc_loss, ctc_loss_and_metrics, text_to_labels
from granite_jax.train import lora as lora_lib
from granite_jax.train.step import Remat, TrainConfig, Trainer, trainable_mask

pytestmark = pytest.mark.torch
BASE = dataclasses.replace(TINY, dropout=0.0)
CONFIGS = {
    "one_layer": dataclasses.replace(BASE, num_layers=1),
    "two_layers": dataclasses.replace(BASE, num_layers=2),
    "three_layers_even_kernel": dataclasses.replace(BASE, num_layers=3, conv_kernel_size=4),
    "heads_x_dim_ne_hidden": dataclasses.replace(BASE, num_layers=2, num_heads=3, dim_head=8),
    "plus": dataclasses.replace(BASE, num_layers=3, cat_hidden_layers=(0, 1)),
    "production_2_layers": dataclasses.replace(PRODUCTION, num_layers=2, dropout=0.0),
}


def fresh(model):
    """A copy with arrays of its own (Trainer steps donate their arrays; nnx.clone shares them)."""
    return jax.tree.map(jnp.copy, nnx.clone(model))


def hf_names(state) -> dict[str, np.ndarray]:
    """An NNX state (parameters or gradients) under HF's names and layouts."""
    return flax_to_hf(variables_of(state, stacked="layers"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            ref = make_hf_checkpoint(CONFIGS[name], d / "hf", seed=len(name))
            convert_cli(d / "hf", d / "gj")
            cache[name] = (ref, granite_jax.load(d / "gj").model)
        return cache[name]

    return get


def _batch(cfg, b: int, t: int, lengths=None, seed: int = 0, label_len: int = 6):
    rng = np.random.default_rng(seed)
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    label_lengths = rng.integers(1, label_len + 1, b)
    labels = rng.integers(1, cfg.output_dim, (b, label_len)) * (np.arange(label_len)[None] < label_lengths[:, None])
    return {
        "features": rng.standard_normal((b, t, cfg.input_dim)).astype(np.float32),
        "lengths": lengths.astype(np.int32),
        "labels": labels.astype(np.int32),
        "label_lengths": label_lengths.astype(np.int32),
    }


def _torch_step(ref, batch, mid_weight, dtype=None):
    """(loss, {name: grad}, {name: buffer}) of the torch reference in train mode, on a copy."""
    import torch

    r = copy.deepcopy(ref)
    if dtype is not None:
        r = r.to(dtype)
    r.train()
    r.zero_grad()
    b = dict(batch)
    b["features"] = torch.as_tensor(batch["features"]).to(dtype or torch.float32).numpy()
    loss = hf_ctc_loss(r, b["features"], b["lengths"], b["labels"], b["label_lengths"], mid_weight)
    # a parameter the loss never reaches (out_mid without self-conditioning) has no torch grad: zero
    grads = {
        k: (p.grad if p.grad is not None else torch.zeros_like(p)).double().numpy() for k, p in r.named_parameters()
    }
    buffers = {k: v.double().numpy() for k, v in r.named_buffers() if "running" in k or "tracked" in k}
    return loss, grads, buffers


def _jax_step(model, batch, mid_weight, strategy=None):
    m = nnx.clone(model)
    m.train()
    if strategy is None:
        loss, grads = nnx.jit(nnx.value_and_grad(lambda m, b: ctc_loss(m, b, mid_weight)))(m, batch)
    else:
        (loss, _), grads = nnx.jit(
            nnx.value_and_grad(lambda m, b: ctc_loss_and_metrics(m, b, mid_weight, None, strategy), has_aux=True)
        )(m, batch)
    return float(loss), hf_names(grads), hf_names(m)


def _check(got: dict, want32: dict, want64=None, tol: float = 1e-4, what: str = "") -> None:
    """Per tensor: within tol of max|torch|; else within 2x of torch fp32's own error against fp64."""
    bad = []
    for k, w in want32.items():
        g = np.asarray(got[k], np.float64)
        scale = max(np.abs(w).max(), 1e-30)
        err = np.abs(g - w).max()
        if err <= tol * scale:
            continue
        if want64 is not None:
            own = np.abs(want32[k] - want64[k]).max()
            if np.abs(g - want64[k]).max() <= 2 * own + 1e-7 * scale:
                continue
        bad.append(f"{k}: {err / scale:.2e}")
    assert not bad, f"{what}: " + ", ".join(bad[:10])


# Every config with and without the intermediate CTC loss, except production widths without it (the longest
# case; its loss is a term of the mixed one, whose gradients the 0.3 case checks).
LOSS_CASES = [(n, w) for n in CONFIGS for w in (0.0, 0.3) if (n, w) != ("production_2_layers", 0.0)]


@pytest.mark.parametrize(("name", "mid_weight"), LOSS_CASES, ids=[f"{n}-{w}" for n, w in LOSS_CASES])
def test_loss_gradients_and_statistics_equal_torch(pairs, name, mid_weight):
    import torch

    ref, model = pairs(name)
    cfg = CONFIGS[name]
    t = 3 * cfg.context_size + 1 if cfg.context_size < 100 else 90
    batch = _batch(cfg, 3, t, seed=1)
    if mid_weight and cfg.self_conditioning_layer == 0:
        with pytest.raises(ValueError, match="mid_weight needs a self-conditioning layer"):
            _jax_step(model, batch, mid_weight)
        return
    loss, grads, stats = _jax_step(model, batch, mid_weight)
    tloss, tgrads, tstats = _torch_step(ref, batch, mid_weight)
    assert set(grads) >= set(tgrads)
    t64 = None
    try:
        _check(grads, tgrads, what=f"{name} gradients")
    except AssertionError:  # an ill-conditioned model: the honest yardstick is torch fp32's own error
        t64 = _torch_step(ref, batch, mid_weight, torch.float64)
        _check(grads, tgrads, t64[1], what=f"{name} gradients")
    assert abs(loss - tloss) <= 1e-4 * max(abs(tloss), 1.0) or (
        t64 is not None and abs(loss - t64[0]) <= 2 * abs(tloss - t64[0]) + 1e-6
    ), (loss, tloss)
    _check({k: stats[k] for k in tstats}, tstats, what=f"{name} running statistics")
    changed = [k for k in tstats if "running_mean" in k and not np.allclose(tstats[k], hf_names(model)[k])]
    assert changed, "the step left BatchNorm's running statistics as they were"


def test_padding_changes_nothing(pairs):
    """Mixed lengths: the batch padded to a longer T with garbage gives the same loss, gradients, statistics."""
    _, model = pairs("three_layers_even_kernel")
    cfg = CONFIGS["three_layers_even_kernel"]
    lengths = [33, 17, 25]
    batch = _batch(cfg, 3, 33, lengths, seed=2)
    x = batch["features"].copy()
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    batch["features"] = x
    padded = dict(batch)
    garbage = np.random.default_rng(3).standard_normal((3, 60, cfg.input_dim)).astype(np.float32) * 50
    garbage[:, :33] = x
    for i, n in enumerate(lengths):
        garbage[i, :n] = x[i, :n]
    padded["features"] = garbage
    a, b = _jax_step(model, batch, 0.3), _jax_step(model, padded, 0.3)
    assert abs(a[0] - b[0]) <= 1e-6 * abs(a[0])
    _check(b[1], {k: np.asarray(v, np.float64) for k, v in a[1].items()}, tol=1e-5, what="gradients")
    _check(b[2], {k: np.asarray(v, np.float64) for k, v in a[2].items()}, tol=1e-6, what="statistics")


def test_unalignable_utterances_contribute_nothing(pairs):
    """Labels longer than the frames allow: 0 loss and 0 gradient (torch's zero_infinity), counted."""
    ref, model = pairs("two_layers")
    cfg = CONFIGS["two_layers"]
    batch = _batch(cfg, 3, 12, seed=4)
    batch["labels"] = np.tile(np.array([[3, 3, 3, 3, 3, 3, 3, 3]], np.int32), (3, 1))
    batch["label_lengths"] = np.array([8, 2, 3], np.int32)  # 8 repeats need 15 frames > 12
    m = nnx.clone(model)
    m.train()
    (loss, metrics), grads = nnx.jit(nnx.value_and_grad(ctc_loss_and_metrics, has_aux=True))(m, batch)
    assert int(metrics["unalignable"]) == 1 and np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    tloss, tgrads, _ = _torch_step(ref, batch, 0.0)
    assert abs(float(loss) - tloss) <= 1e-4 * abs(tloss)
    _check(hf_names(grads), tgrads, what="gradients with an unalignable row")


def test_text_to_labels():
    labels, lengths = text_to_labels(["ab", "", "Zz!"], 128)
    assert labels.tolist() == [[97, 98, 0], [0, 0, 0], [90, 122, 33]] and lengths.tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match=r"text 1 has characters .*'é' \(233\)"):
        text_to_labels(["ok", "café"], 128)
    with pytest.raises(ValueError, match=r"'\\x00' \(0\)"):
        text_to_labels(["a\x00"], 128)
    with pytest.raises(TypeError, match="list of strings"):
        text_to_labels("abc", 128)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_one_optimizer_step_equals_torch(pairs, optimizer):
    """optax.sgd / optax.adamw from the same start give torch's SGD / AdamW weights after one step."""
    import torch

    ref, model = pairs("two_layers")
    cfg = CONFIGS["two_layers"]
    batch = _batch(cfg, 2, 20, seed=5)
    lr, wd = 1e-2, 0.05
    r = copy.deepcopy(ref)
    r.train()
    params = [p for _, p in r.named_parameters()]
    topt = (
        torch.optim.SGD(params, lr=lr)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=lr, weight_decay=wd, eps=1e-8)
    )
    for _ in range(2):
        topt.zero_grad()
        hf_ctc_loss(r, batch["features"], batch["lengths"], batch["labels"], batch["label_lengths"])
        topt.step()
    m = nnx.clone(model)
    m.train()
    tx = optax.sgd(lr) if optimizer == "sgd" else optax.adamw(lr, weight_decay=wd, eps=1e-8)
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, batch):
        loss, grads = nnx.value_and_grad(ctc_loss)(m, batch)
        opt.update(m, grads)
        return loss

    for _ in range(2):
        step(m, opt, batch)
    got = hf_names(m)
    want = {k: p.detach().double().numpy() for k, p in r.named_parameters()}
    start = {k: p.detach().double().numpy() for k, p in ref.named_parameters()}
    moved = {k: want[k] - start[k] for k in want}
    _check({k: np.asarray(got[k], np.float64) - start[k] for k in want}, moved, tol=1e-3, what=f"{optimizer} update")


def test_dropout_is_reproducible_from_a_seed():
    cfg = dataclasses.replace(TINY, dropout=0.2, num_layers=2)
    m = GraniteSpeechEncoder(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg, 2, 20)
    m.train()
    with pytest.raises(ValueError, match="needs a random key"):
        ctc_loss(m, batch)
    a, b = ctc_loss(m, batch, 0.0, jax.random.key(1)), ctc_loss(m, batch, 0.0, jax.random.key(1))
    c = ctc_loss(m, batch, 0.0, jax.random.key(2))
    assert float(a) == float(b) != float(c)
    m.eval()
    assert float(ctc_loss(m, batch)) == float(ctc_loss(m, batch, 0.0, jax.random.key(3)))


def test_remat_gives_the_same_gradients(pairs):
    _, model = pairs("three_layers_even_kernel")
    batch = _batch(CONFIGS["three_layers_even_kernel"], 3, 30, [30, 20, 11], seed=6)
    a, b = _jax_step(model, batch, 0.3), _jax_step(model, batch, 0.3, Remat())
    assert abs(a[0] - b[0]) <= 1e-6 * abs(a[0])
    _check(b[1], {k: np.asarray(v, np.float64) for k, v in a[1].items()}, tol=1e-5, what="remat gradients")
    _check(b[2], {k: np.asarray(v, np.float64) for k, v in a[2].items()}, tol=1e-6, what="remat statistics")


def test_bf16_compute_keeps_fp32_master_weights(pairs):
    _, model = pairs("two_layers")
    batch = _batch(CONFIGS["two_layers"], 2, 24, seed=7)
    full, half = fresh(model), fresh(model)
    t32, t16 = (
        Trainer(full, TrainConfig(learning_rate=1e-3)),
        Trainer(half, TrainConfig(learning_rate=1e-3, compute_dtype="bfloat16")),
    )
    a, b = t32.step(batch), t16.step(batch)
    assert abs(a["loss"] - b["loss"]) < 0.05 * abs(a["loss"])
    assert all(v.dtype == np.float32 for k, v in hf_names(half).items() if v.dtype.kind == "f")


def test_freezing_by_pattern(pairs):
    _, model = pairs("three_layers_even_kernel")
    batch = _batch(CONFIGS["three_layers_even_kernel"], 2, 24, seed=8)
    start = hf_names(model)
    m = fresh(model)
    tr = Trainer(m, TrainConfig(learning_rate=1e-2, weight_decay=0.1, freeze=("layers.{0-1}.*", "input_linear.*")))
    for _ in range(2):
        tr.step(batch)
    after = hf_names(m)
    moved = {k for k in start if not np.array_equal(start[k], after[k]) and "running" not in k and "tracked" not in k}
    assert moved and all(k.startswith(("layers.2.", "out.", "out_mid.")) for k in moved), sorted(moved)[:5]
    assert not any(k.startswith(("layers.0.", "layers.1.")) and "running" not in k for k in moved)
    only = fresh(model)
    Trainer(only, TrainConfig(learning_rate=1e-2, train_only=("out.*",))).step(batch)
    moved = {
        k
        for k, v in hf_names(only).items()
        if not np.array_equal(start[k], v) and v.dtype.kind == "f" and "running" not in k
    }
    assert moved == {"out.weight", "out.bias"}, moved
    with pytest.raises(ValueError, match="match no parameter"):
        trainable_mask(model, freeze=("layers.*.nothing",))


def test_lora_trains_only_its_adapters_and_merges(pairs):
    ref, model = pairs("two_layers")
    cfg = CONFIGS["two_layers"]
    batch = _batch(cfg, 2, 24, seed=9)
    start = hf_names(model)
    m = fresh(model)
    x = batch["features"]
    before = np.asarray(m(x))
    lora_lib.add_lora(m, rank=2, alpha=4.0)
    np.testing.assert_allclose(np.asarray(m(x)), before, atol=1e-5)  # B = 0: the base model at the start
    tr = Trainer(m, TrainConfig(learning_rate=1e-2, batch_norm="frozen"), wrt=nnx.LoRAParam)
    for _ in range(3):
        tr.step(batch)
    m.eval()
    adapted = np.asarray(m(x))
    assert np.abs(adapted - before).max() > 1e-3
    lora_lib.merge_lora(m)
    np.testing.assert_allclose(np.asarray(m(x)), adapted, atol=1e-4)
    after = hf_names(m)
    assert set(after) == set(start)
    moved = {k for k in start if not np.array_equal(start[k], after[k])}
    assert moved and all(".attn." in k or ".ff1." in k or ".ff2." in k for k in moved), moved

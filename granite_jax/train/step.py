"""One optimisation step, and what shapes it: the optimizer, freezing, rematerialisation, bf16, devices.

The NNX idiom, as a user would write it:

    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(train.ctc_loss)(model, batch)
    opt.update(model, grads)

`Trainer` does this in one jitted, donated step, with gradient clipping, accumulation (`optax.MultiSteps`),
warmup + cosine schedules, frozen parameters, per-block rematerialisation, optional bf16 compute over fp32
master weights, and the batch split over a mesh of devices (parameters replicated, or sharded FSDP-style).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from granite_jax.checkpoint.params import _names
from granite_jax.models.conformer import ConformerBlock, GraniteSpeechEncoder, Plain, Strategy
from granite_jax.runtime.devices import AXIS, DeviceSpec, resolve_devices
from granite_jax.train.loss import Batch, ctc_loss_and_metrics


class Remat(Plain):
    """The whole batch at once, each block rematerialised: the backward pass recomputes a block's
    intermediates instead of storing them, so activation memory grows with one block, not all of them."""

    def block(self, block: ConformerBlock, x, valid, after, key):
        return after(nnx.remat(lambda b, x, v, k: b(x, v, k))(block, x, valid, key), valid)


REMAT_AUTO_FRAMES = 1024  # batch frames (B x T) above which `remat="auto"` rematerialises (it costs no time on CPU)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. `learning_rate` peaks after `warmup_steps` and decays along a cosine to
    `final_lr_ratio` of the peak at `total_steps` (constant after warmup when None).

    `optimizer`: "adamw" (`b1`, `b2`, `eps`, decoupled `weight_decay`, as torch's AdamW) or "sgd"
    (`momentum`, 0 = plain SGD). `grad_clip`: global-norm clipping (None: off). `accumulate`: micro-batches
    per update (`optax.MultiSteps`). `mid_weight`: the intermediate CTC loss's weight. `remat`: True, False
    or "auto" (on for batches above REMAT_AUTO_FRAMES frames). `compute_dtype`: "bfloat16" computes in bf16
    over fp32 master weights. `freeze` / `train_only`: parameter-name patterns (below). `batch_norm`:
    "train" (batch statistics, running statistics updated) or "frozen" (running statistics, as in eval).

    Patterns match checkpoint names (`layers.3.attn.to_q.kernel`, `out.bias`) with shell wildcards, plus
    ranges of layer indices in braces: `layers.{0-11}.*` is the lowest twelve blocks.
    """

    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int | None = None
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    grad_clip: float | None = 1.0
    accumulate: int = 1
    mid_weight: float = 0.0
    remat: bool | str = "auto"
    compute_dtype: str = "float32"
    freeze: tuple[str, ...] = ()
    train_only: tuple[str, ...] | None = None
    batch_norm: str = "train"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("learning_rate", "weight_decay", "momentum", "final_lr_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not 0.0 <= self.mid_weight <= 1.0:
            raise ValueError(f"mid_weight must lie in [0, 1], got {self.mid_weight!r}")
        for name in ("warmup_steps", "accumulate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "accumulate" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'accumulate' else 'non-negative'} integer")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {self.total_steps!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.remat not in (True, False, "auto"):
            raise ValueError(f"remat must be True, False or 'auto', got {self.remat!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.batch_norm not in ("train", "frozen"):
            raise ValueError(f"batch_norm must be 'train' or 'frozen', got {self.batch_norm!r}")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if self.train_only is not None:
            object.__setattr__(self, "train_only", tuple(self.train_only))

    def schedule(self) -> optax.Schedule:
        peak = self.learning_rate
        if self.total_steps is None:
            if not self.warmup_steps:
                return optax.constant_schedule(peak)
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, self.warmup_steps), optax.constant_schedule(peak)],
                [self.warmup_steps],
            )
        return optax.warmup_cosine_decay_schedule(
            0.0 if self.warmup_steps else peak,
            peak,
            self.warmup_steps,
            max(self.total_steps, self.warmup_steps + 1),
            end_value=peak * self.final_lr_ratio,
        )


def make_optimizer(cfg: TrainConfig, mask: Any = None) -> optax.GradientTransformation:
    """clip -> AdamW / SGD (scheduled) -> frozen updates zeroed; accumulated over `cfg.accumulate` micro-steps."""
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    lr = cfg.schedule()
    if cfg.optimizer == "adamw":
        parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    else:
        parts.append(optax.sgd(lr, momentum=cfg.momentum or None))
        if cfg.weight_decay:
            parts.insert(-1, optax.add_decayed_weights(cfg.weight_decay))
    if mask is not None:
        parts.append(_scale_by_mask(mask))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, cfg.accumulate) if cfg.accumulate > 1 else tx


def _scale_by_mask(mask: Any) -> optax.GradientTransformation:
    """Updates times a 0/1 mask of the same tree: frozen entries never move (weight decay included)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# -- freezing by name --------------------------------------------------------------------------------------
def _compile_pattern(pattern: str) -> re.Pattern:
    """A shell pattern with `{a-b}` ranges of integers (layer indices) as a regex."""
    parts = re.split(r"\{(\d+)-(\d+)\}", pattern)
    out = ""
    for k in range(0, len(parts), 3):
        out += fnmatch.translate(parts[k])[4:-3]  # the body of fnmatch's (?s:...)\Z
        if k + 2 < len(parts):
            lo, hi = int(parts[k + 1]), int(parts[k + 2])
            out += "(?:" + "|".join(str(i) for i in range(lo, hi + 1)) + ")"
    return re.compile(rf"(?s:{out})\Z")


def trainable_mask(
    model: nnx.Module,
    freeze: Sequence[str] = (),
    train_only: Sequence[str] | None = None,
    wrt: Any = nnx.Param,
    stacked: Any = None,
) -> tuple[Any, int, int]:
    """(a 0/1 mask shaped like `nnx.state(model, wrt)`, trainable values, frozen values).

    A parameter trains when it matches `train_only` (all, when None) and no pattern of `freeze`. Names are
    the checkpoints' (`layers.3.attn.to_q.kernel`): a stacked variable gets a mask per layer.
    """
    stacked = stacked if stacked is not None else getattr(model, "stacking", "layers")
    freeze_re = [_compile_pattern(p) for p in freeze]
    only_re = None if train_only is None else [_compile_pattern(p) for p in train_only]
    used = set()

    def trains(name: str) -> bool:
        hits = [p.pattern for p in freeze_re if p.match(name)]
        used.update(hits)
        if only_re is not None:
            keep = [p.pattern for p in only_re if p.match(name)]
            used.update(keep)
            if not keep:
                return False
        return not hits

    counts = [0, 0]

    def leaf(path, value):
        entries = list(_names(path, value.shape, stacked))
        if entries[0][1] is None:
            flags = np.array(trains(entries[0][0]), np.float32)
        else:
            flags = np.array([trains(n) for n, _ in entries], np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
        per = value.size // len(entries)
        counts[0] += int(flags.sum()) * per
        counts[1] += int((1 - flags).sum()) * per
        return jnp.asarray(flags)

    state = nnx.state(model, wrt)
    mask = jax.tree.map_with_path(lambda p, v: leaf(tuple(_key(k) for k in p), v), state)
    unused = [p for p in list(freeze) + list(train_only or ()) if _compile_pattern(p).pattern not in used]
    if unused:
        raise ValueError(f"freeze / train_only patterns that match no parameter: {unused}")
    return mask, counts[0], counts[1]


def _key(k) -> Any:
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


# -- compute dtype, devices --------------------------------------------------------------------------------
def set_compute_dtype(model: nnx.Module, dtype: Any) -> None:
    """Compute in `dtype` (activations and matmul inputs); parameters stay in their own dtype (the master
    weights). BatchNorm and LayerNorm statistics and the softmaxes stay in fp32."""
    model.set_attributes(dtype=jnp.dtype(dtype), raise_if_not_found=False)


def _fsdp_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Shard the largest axis that the device count divides (FSDP); replicate small or indivisible arrays."""
    if n == 1 or int(np.prod(shape)) < 2**16:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return PartitionSpec(*([None] * axis + [AXIS]))
    return PartitionSpec()


class Trainer:
    """Trains `model` (an NNX encoder, changed in place) with `config`; `step(batch)` -> metrics.

    `devices`: as for `load` (all local devices by default); the batch is split over them by rows, the
    parameters replicated, or sharded over the same axis with `fsdp=True`. The batch size must be a multiple
    of the device count. `wrt`: which variables train (`nnx.LoRAParam` after `lora.add_lora`).
    Steps donate the model's arrays: other references to them (an `nnx.clone`, say) are consumed.
    """

    def __init__(
        self,
        model: GraniteSpeechEncoder,
        config: TrainConfig = TrainConfig(),
        *,
        devices: DeviceSpec = None,
        fsdp: bool = False,
        wrt: Any = nnx.Param,
    ):
        self.model = model
        self.config = config
        self.devices = resolve_devices(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.train_mode()
        if config.compute_dtype != "float32":
            set_compute_dtype(model, config.compute_dtype)
        freezing = bool(config.freeze) or config.train_only is not None
        self.mask, self.num_trainable, self.num_frozen = (
            trainable_mask(model, config.freeze, config.train_only, wrt)
            if freezing
            else (None, sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, wrt))), 0)
        )
        self.optimizer = nnx.Optimizer(model, make_optimizer(config, self.mask), wrt=wrt)
        for node in (model, self.optimizer):
            self._place(node, fsdp)
        self._schedule = config.schedule()
        self._steps = {}

    def train_mode(self) -> None:
        """`model.train()`, with BatchNorm kept on its running statistics when `batch_norm="frozen"`."""
        self.model.train()
        if self.config.batch_norm == "frozen":
            self.model.set_attributes(use_running_average=True, raise_if_not_found=False)

    def _place(self, node: nnx.Module | nnx.Optimizer, fsdp: bool) -> None:
        """Every variable of `node` on the mesh: replicated, or (fsdp) its largest divisible axis sharded."""
        n = len(self.devices)
        state = nnx.state(node)
        shardings = jax.tree.map(
            lambda v: NamedSharding(self.mesh, _fsdp_spec(v.shape, n) if fsdp else PartitionSpec()), state
        )
        nnx.update(node, jax.device_put(state, shardings))

    def strategy(self, batch_frames: int) -> Strategy:
        remat = self.config.remat
        if remat == "auto":
            remat = batch_frames > REMAT_AUTO_FRAMES
        return Remat() if remat else Plain()

    def _compiled(self, strategy: Strategy):
        key = type(strategy).__name__
        if key not in self._steps:
            mid, mask = self.config.mid_weight, self.mask

            def step(model, optimizer, batch, rng):
                def loss_fn(model):
                    return ctc_loss_and_metrics(model, batch, mid, rng, strategy)

                (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
                if mask is not None:
                    grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), grads, mask)
                metrics["grad_norm"] = optax.tree.norm(grads)
                optimizer.update(model, grads)
                return metrics

            self._steps[key] = nnx.jit(step, donate_argnums=(0, 1))
        return self._steps[key]

    def split_batch(self, batch: Batch) -> dict[str, jax.Array]:
        """The batch's arrays split by rows over the devices."""
        b = int(np.shape(batch["features"])[0])
        if b % len(self.devices):
            raise ValueError(f"a batch of {b} rows does not split over {len(self.devices)} devices")
        rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return {
            k: jax.device_put(jnp.asarray(batch[k]), rows) for k in ("features", "lengths", "labels", "label_lengths")
        }

    def step(self, batch: Batch, key: jax.Array | None = None) -> dict[str, float]:
        """One (micro-)step on `batch`; `key` drives dropout. Returns the metrics as Python numbers."""
        b, t = np.shape(batch["features"])[:2]
        updates = int(self.optimizer.step.get_value()) // self.config.accumulate
        metrics = self._compiled(self.strategy(b * t))(self.model, self.optimizer, self.split_batch(batch), key)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        out["lr"] = float(self._schedule(updates))
        return out

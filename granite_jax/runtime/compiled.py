"""The Runner's compiled programs: each a per-rows function of the modules' weight arrays and a batch, run by
every device on its own rows (`RowMesh.jit`), traced once per input shape.

- `features`: waveforms -> the family's front end.
- `forward`: features -> the encoder (one call, the blocks in a scan).
- `encode`: waveforms -> front end -> encoder -> projector, in one call.
- `begin`, `block`, `end`: the same, one block per call on weights of its own (layerwise.py).
- `project`: hidden states -> the projector; `ctc`: hidden states -> the CTC head.

Every program also says whether each row's input and output are finite in their valid frames, for the one
non-finite policy (`results.check_finite`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from granite_jax.models.conformer import masked
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.runtime.devices import REPLICATED as R
from granite_jax.runtime.devices import ROWS, RowMesh
from granite_jax.runtime.layerwise import BlockWeights


class Bound:
    """An NNX module split once into its graph and its Variables, for use under `jax.jit`.

    Reading the Variables' values per call is cheap (`nnx.state` would walk the whole graph every call) and
    still sees every update to them (fine-tuning). Replacing submodules needs a new Runner.
    """

    def __init__(self, module: nnx.Module):
        self.module = module
        self.graphdef, state = nnx.split(module)
        self.variables = nnx.to_flat_state(state)

    def values(self) -> list[jax.Array]:
        return [v.get_value() for _, v in self.variables]

    def place(self, sharding: jax.sharding.Sharding) -> None:
        """Put every Variable's value (the module's own Variables) on `sharding`."""
        for _, v in self.variables:
            v.set_value(jax.device_put(v.get_value(), sharding))

    def merge(self, values) -> nnx.Module:
        """The module over `values`, in eval mode whatever mode it was bound in (the Runner is inference)."""
        pairs = [(p, v.replace(x)) for (p, v), x in zip(self.variables, values, strict=True)]
        module = nnx.merge(self.graphdef, nnx.from_flat_state(pairs))
        module.eval()
        return module

    def num_values(self) -> int:
        return sum(int(np.prod(x.shape)) for x in self.values())


def valid_mask(lengths: jax.Array, t: int) -> jax.Array:
    """(B, t) mask of the first `lengths[i]` frames of each row."""
    return jnp.arange(t)[None, :] < lengths[:, None]


def finite_rows(x: jax.Array, valid: jax.Array) -> jax.Array:
    """(B,) whether each row of x is finite in its valid frames (what padding holds does not matter)."""
    return jnp.all(jnp.isfinite(x) | ~valid[..., None], axis=(1, 2))


def embedding_counts(frame_lengths: jax.Array, pcfg: ProjectorConfig) -> jax.Array:
    return -(-frame_lengths // pcfg.window_size) * pcfg.num_queries


class Compiled:
    """The jitted programs of one Runner (see the module docstring); `traces` counts input shapes seen."""

    def __init__(
        self,
        family,
        encoder: Bound,
        projector: Bound | None,
        blocks: BlockWeights | None,
        rows: RowMesh,
        chunk_blocks: int | None,
        compute_dtype,
    ):
        self.family, self.encoder, self.projector, self.blocks = family, encoder, projector, blocks
        self.chunk_blocks, self.dtype = chunk_blocks, compute_dtype
        self.traces = 0
        states = family.states_spec(ROWS)
        carry = family.carry_spec(ROWS)

        def jit(fn: Callable, in_specs, out_specs=ROWS, *, counted: bool = True, **kw) -> Callable:
            return rows.jit(fn, in_specs, out_specs, on_trace=self._count if counted else None, **kw)

        self.features = jit(self._features, (ROWS, ROWS), static=("hf_batch",), out_shardings=rows.rows)
        self.forward = jit(self._forward, (R, ROWS, ROWS), (ROWS, states, ROWS, ROWS), static=("hidden_states",))
        self.encode = jit(
            self._encode,
            (R, R, ROWS, ROWS, ROWS),
            (ROWS, ROWS, ROWS, states, ROWS),
            static=("hf_batch", "with_projector", "hidden_states"),
        )
        self.project = jit(self._project, (R, ROWS, ROWS), out_shardings=rows.rows)
        self.ctc = jit(self._ctc, (R, ROWS, ROWS))
        self.ctc_ids = jit(self._ctc_ids, (R, ROWS, ROWS))
        self.begin = jit(
            self._begin,
            (R, ROWS, ROWS, ROWS),
            (ROWS, ROWS, carry, ROWS),
            static=("hf_batch", "waveforms", "hidden_states"),
        )
        block = dict(counted=False, static=("kind", "hidden_states"))
        self.block = jit(self._block, (R, R, carry, ROWS, R), (carry, ROWS), donate=(2,), **block)
        self.shrinking_block = jit(self._block, (R, R, carry, ROWS, R), (carry, ROWS), **block)
        self.end = jit(
            self._end,
            (R, R, carry, ROWS, ROWS, ROWS),
            (ROWS, ROWS, states, ROWS),
            counted=False,
            static=("with_projector", "hidden_states"),
        )

    def _count(self) -> None:
        self.traces += 1

    # -- the per-rows bodies -----------------------------------------------------------------------------------
    def _run_encoder(self, values, features, frame_lengths, hidden_states: bool = False):
        """(last hidden state, per-layer hidden states or None, the output frames' mask)."""
        valid = valid_mask(frame_lengths, features.shape[1])
        out = self.family.encode(self.encoder.merge(values), features, valid, self.chunk_blocks, hidden_states)
        return out.last_hidden_state, out.hidden_states, out.valid

    def _features(self, waveforms, sample_lengths, *, hf_batch):
        return self.family.features(waveforms, sample_lengths, hf_batch)

    def _forward(self, values, features, frame_lengths, *, hidden_states):
        hidden, states, valid = self._run_encoder(values, features, frame_lengths, hidden_states)
        finite_in = finite_rows(features, valid_mask(frame_lengths, features.shape[1]))
        return hidden, states, finite_in, finite_rows(hidden, valid)

    def _encode(self, enc_values, proj_values, waveforms, sample_lengths, frame_lengths, *, hf_batch, **flags):
        features = self.family.features(waveforms, sample_lengths, hf_batch).astype(self.dtype)
        hidden, states, valid = self._run_encoder(enc_values, features, frame_lengths, flags["hidden_states"])
        embeddings, ok = self._project_checked(proj_values, hidden, valid, frame_lengths, flags["with_projector"])
        return features, hidden, embeddings, states, ok

    def _project_checked(self, proj_values, hidden, valid, frame_lengths, with_projector: bool):
        """(the projector's embeddings or None, whether each row's hidden states and embeddings are finite)."""
        ok = finite_rows(hidden, valid)
        embeddings = None
        if with_projector:
            embeddings = self.projector.merge(proj_values)(hidden)
            counts = embedding_counts(frame_lengths, self.projector.module.config)
            ok &= finite_rows(embeddings, valid_mask(counts, embeddings.shape[1]))
        return embeddings, ok

    def _begin(self, values, x, x_lengths, frame_lengths, *, hf_batch, waveforms, hidden_states):
        features = self.family.features(x, x_lengths, hf_batch).astype(self.dtype) if waveforms else x
        valid = valid_mask(frame_lengths, features.shape[1])
        model = self.encoder.merge(values)
        carry, aux = self.family.begin(model, features, valid, self.chunk_blocks, hidden_states)
        return features, finite_rows(features, valid), carry, aux

    def _block(self, values, block_values, carry, aux, i, *, kind, hidden_states):
        model, block = self.encoder.merge(values), self.blocks.merge(kind[0], block_values)
        return self.family.step(model, block, carry, aux, i, kind, self.chunk_blocks, hidden_states)

    def _end(self, values, proj_values, carry, aux, states, frame_lengths, *, with_projector, hidden_states):
        out = self.family.end(self.encoder.merge(values), carry, aux, states, hidden_states)
        hidden, valid = out.last_hidden_state, out.valid
        embeddings, ok = self._project_checked(proj_values, hidden, valid, frame_lengths, with_projector)
        return hidden, embeddings, out.hidden_states, ok

    def _project(self, values, h, frame_lengths):
        valid = valid_mask(frame_lengths, h.shape[1])
        emb = self.projector.merge(values)(masked(h, valid))
        counts = embedding_counts(frame_lengths, self.projector.module.config)
        return emb, finite_rows(h, valid), finite_rows(emb, valid_mask(counts, emb.shape[1]))

    def _ctc_ids(self, values, hidden_states, frame_lengths):
        """The CTC head's per-frame argmax, in tiles of frames (the vocabulary-wide logits are never held for
        the whole input), and whether each row's hidden states and logits are finite."""
        model = self.encoder.merge(values)
        b, t, d = hidden_states.shape
        span = min(t, self.family.tile_frames(self.chunk_blocks) or t)
        per_row = -(-t // span)
        h = jnp.pad(hidden_states, ((0, 0), (0, per_row * span - t), (0, 0)))

        def tile(k, acc):
            ids, finite = acc
            r, s = k // per_row, k % per_row * span
            logits = self.family.ctc_logits(model, jax.lax.dynamic_slice(h, (r, s, 0), (1, span, d)))
            ids = jax.lax.dynamic_update_slice(ids, jnp.argmax(logits, axis=-1).astype(jnp.int32), (r, s))
            return ids, jax.lax.dynamic_update_slice(finite, jnp.isfinite(logits).all(axis=-1), (r, s))

        init = (jnp.zeros((b, per_row * span), jnp.int32), jnp.ones((b, per_row * span), bool))
        ids, finite = jax.lax.fori_loop(0, b * per_row, tile, init)
        valid = valid_mask(frame_lengths, t)
        return ids[:, :t], finite_rows(hidden_states, valid), (finite[:, :t] | ~valid).all(axis=1)

    def _ctc(self, values, hidden_states, frame_lengths):
        valid = valid_mask(frame_lengths, hidden_states.shape[1])
        logits = self.family.ctc_logits(self.encoder.merge(values), hidden_states)
        return logits, finite_rows(hidden_states, valid), finite_rows(logits, valid)

    # -- one block per call ------------------------------------------------------------------------------------
    def layerwise(
        self, x, x_lengths, frame_lengths, *, hf_batch=False, waveforms=False, with_projector=False, hidden_states=False
    ):
        """begin, each block on its own weights, end: (features, their rows' finiteness, hidden, embeddings,
        per-layer states, outputs' finiteness)."""
        values = self.encoder.values()
        flags = dict(hidden_states=hidden_states)
        features, finite_in, carry, aux = self.begin(
            values, x, x_lengths, frame_lengths, hf_batch=hf_batch, waveforms=waveforms, **flags
        )
        states = []
        for i, (kind, (_, block_values)) in enumerate(zip(self.family.block_kinds(), self.blocks.blocks, strict=True)):
            step = self.shrinking_block if kind[1] else self.block
            carry, own = step(values, block_values, carry, aux, np.int32(i), kind=kind, **flags)
            if own is not None:
                states.append(own)
        proj_values = self.projector.values() if with_projector else None
        hidden, emb, states, ok = self.end(
            values, proj_values, carry, aux, tuple(states), frame_lengths, with_projector=with_projector, **flags
        )
        return features, finite_in, hidden, emb, states, ok

"""What `granite_jax.load` returns: the modules behind jit boundaries, with length buckets and devices.

`Runner.encode` composes named steps: validate the waveforms, pad them to a length bucket and split them
over the devices, run log-mel -> encoder -> projector compiled (one call, or layerwise: see layerwise.py),
and cut the result back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from granite_jax import checkpoint, inputs, speech5
from granite_jax.buckets import BucketPolicy, pad_rows
from granite_jax.config import EncoderConfig, FeatureConfig, ProjectorConfig, Speech5Config, Speech5FeatureConfig
from granite_jax.convert.convert import convert_hf
from granite_jax.ctc import Transcript, ctc_greedy_ids
from granite_jax.devices import REPLICATED, ROWS, DeviceSpec, RowMesh, resolve_devices
from granite_jax.families import Granite4, Granite5
from granite_jax.features import prepare_waveforms
from granite_jax.layerwise import BlockWeights, stacks_of
from granite_jax.modeling import GraniteSpeechEncoder, encoder_from_params, masked
from granite_jax.projector import GraniteSpeechProjector, num_audio_embeddings, projector_from_params
from granite_jax.speech5 import GraniteSpeech5Encoder
from granite_jax.tokenizer import CTCTokenizer

BATCH_MODES = ("per_utterance", "hf")


class _Bound:
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


@dataclass(frozen=True)
class EncodeResult:
    """What `Runner.encode` returns; row i is utterance i, padded to the longest.

    `features` (B, T, input_dim) front-end output with `feature_lengths` valid frames per row, and
    `hidden_states` (B, T', output_width) with `lengths` valid frames per row (zeros after; T' = T for 4.x,
    subsampled for Speech 5); `audio_embeddings` (B, E, llm_hidden_size), the projector output that
    Granite Speech feeds its language model, with `embedding_counts` valid rows each (HF's
    audio_embed_sizes); None when the checkpoint has no projector (or `embeddings=False`).
    """

    features: jax.Array
    hidden_states: jax.Array
    lengths: np.ndarray
    audio_embeddings: jax.Array | None = None
    embedding_counts: np.ndarray | None = None
    layer_hidden_states: Any = None
    feature_lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def utterance(self, i: int) -> dict[str, np.ndarray]:
        """Utterance i's valid rows as numpy arrays (hidden_states, and audio_embeddings if any)."""
        out = {"hidden_states": np.asarray(self.hidden_states[i, : self.lengths[i]])}
        if self.audio_embeddings is not None:
            out["audio_embeddings"] = np.asarray(self.audio_embeddings[i, : self.embedding_counts[i]])
        return out


class WaveformBatch(NamedTuple):
    """Waveforms padded to a bucket: `samples` (B, S) float32, `sample_lengths` and `frames` (B,) int32."""

    samples: np.ndarray
    sample_lengths: np.ndarray
    frames: np.ndarray


def _batch_mode(batch_mode: str) -> bool:
    """True for HF batch mode."""
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
    return batch_mode == "hf"


class Runner:
    """A Granite Speech encoder (and projector, when the checkpoint has one) ready to run under `jax.jit`.

    - `encode(waveforms)`: audio -> log-mel -> encoder -> projector, in one compiled call.
    - `extract_features(waveforms)`: the checkpoint's log-mel front end alone.
    - `encode_features(features, lengths)`: log-mel -> encoder hidden states.
    - `audio_embeddings(hidden_states, lengths)`: the projector (what Granite feeds its LLM).
    - `ctc_logits(hidden_states)` and `ctc_greedy(...)`: the CTC head.
    `model` (and `projector`) are the NNX modules, for probing or fine-tuning.

    `devices`: where it runs; None (default) = all of `jax.local_devices()`, an int = the first that many,
    or a list of local devices. The parameters are replicated on them once, here: the modules' own
    Variables, so values set later must stay so placed (`NamedSharding(self.mesh, PartitionSpec())`), and
    of two Runners on one module the later one's devices win. Batches are split by rows over a 1-D mesh
    with axis "batch", padded to a multiple of the device count with dummy rows that are dropped again. The
    result is the same as on one device; it stays sharded when the batch is a multiple of the device count.

    `layerwise` (what `load` passes): the runner takes the blocks' weights out of the module's stacked
    arrays into arrays of their own and runs one compiled block per call on each (XLA CPU copies every slice
    of stacked weights before its matmuls: see layerwise.py). The results are the same. Reading `model`
    stacks the weights back, and the runner then runs the module as it is.
    """

    def __init__(
        self,
        model: GraniteSpeechEncoder,
        *,
        projector: GraniteSpeechProjector | None = None,
        feature_config: FeatureConfig | Speech5FeatureConfig | None = None,
        tokenizer: CTCTokenizer | None = None,
        buckets: str | Sequence[int] | BucketPolicy = "auto",
        chunk_blocks: int | None = 8,
        provenance: dict | None = None,
        devices: DeviceSpec = None,
        layerwise: bool | BlockWeights = False,
    ):
        _check_chunk_blocks(chunk_blocks)
        self.rows = RowMesh(devices)
        self.devices, self.mesh = self.rows.devices, self.rows.mesh
        self._module = model
        self.config: EncoderConfig | Speech5Config = model.config
        self.projector = projector
        self.projector_config: ProjectorConfig | None = projector.config if projector is not None else None
        if isinstance(model, GraniteSpeech5Encoder):
            if projector is not None:
                raise ValueError("Granite Speech 5 has no projector")
            fc = feature_config or Speech5FeatureConfig(num_mel_bins=self.config.num_mel_bins)
            if tokenizer is not None:
                tokenizer.check_vocab(self.config.vocab_size, self.config.pad_token_id)
            self.family = Granite5(fc, self.config, tokenizer)
        else:
            self.family = Granite4(feature_config or FeatureConfig(), self.config)
        self.feature_config = self.family.feature_config
        self.tokenizer = tokenizer
        self.buckets = BucketPolicy.make(buckets)
        self.chunk_blocks = chunk_blocks
        self.provenance = dict(provenance or {})
        self._compute_dtype = jnp.dtype(model.input_linear.kernel.get_value().dtype)
        self._encoder = _Bound(model)
        self._projector = _Bound(projector) if projector is not None else None
        for bound in (self._encoder, self._projector):
            if bound is not None:
                bound.place(self.rows.replicated)  # once; zero-copy when already on the one device
        self._blocks = None
        if isinstance(layerwise, BlockWeights):  # from `load`: the blocks never stacked
            self._blocks = layerwise
            self._blocks.place(self.rows.replicated)
        elif layerwise and stacks_of(model):
            self._blocks = BlockWeights(model)
        self._traces = 0
        on_rows = self.rows.rows
        self._forward = jax.jit(self._forward_impl, static_argnames=("hidden_states",))
        self._encode = jax.jit(self._encode_impl, static_argnames=("hf_batch", "with_projector", "hidden_states"))
        self._features = jax.jit(self._features_impl, static_argnames=("hf_batch",), out_shardings=on_rows)
        self._project = jax.jit(self._project_impl, out_shardings=on_rows)
        self._ctc = jax.jit(self._ctc_impl)
        self._begin = jax.jit(self._begin_impl, static_argnames=("hf_batch", "waveforms", "hidden_states"))
        self._block = jax.jit(self._block_impl, static_argnames=("kind", "hidden_states"), donate_argnames="carry")
        self._shrinking_block = jax.jit(self._block_impl, static_argnames=("kind", "hidden_states"))
        self._end = jax.jit(self._end_impl, static_argnames=("with_projector", "hidden_states"))

    @property
    def model(self) -> GraniteSpeechEncoder | GraniteSpeech5Encoder:
        """The encoder's NNX module. A layerwise runner (what `load` builds) first stacks the blocks' weights
        back into it, and from then on runs the module as it is (one compiled call, the blocks in a scan)."""
        if self._blocks is not None:
            self._blocks.restore()
            self._blocks = None
        return self._module

    def parameters(self) -> list[jax.Array]:
        """Every weight array the runner computes with (encoder, blocks, projector), without touching `model`."""
        out = self._encoder.values() + (self._blocks.values() if self._blocks is not None else [])
        return out + (self._projector.values() if self._projector is not None else [])

    @property
    def layerwise(self) -> bool:
        """Whether the blocks run one per call on weights of their own (see layerwise.py)."""
        return self._blocks is not None

    # -- the compiled functions (the body of each runs once per trace: per compiled shape) ---------------
    def _run_encoder(self, values, features, frame_lengths, hidden_states: bool = False):
        """(last hidden state, per-layer hidden states or None, the output frames' mask)."""
        out = self.family.encode(
            self._encoder.merge(values),
            features,
            _valid(frame_lengths, features.shape[1]),
            self.chunk_blocks,
            hidden_states,
        )
        return out.last_hidden_state, out.hidden_states, out.valid

    def _forward_impl(self, values, features, frame_lengths, hidden_states):
        self._traces += 1

        def rows(values, features, frame_lengths):
            hidden, states, valid = self._run_encoder(values, features, frame_lengths, hidden_states)
            return (
                hidden,
                states,
                _finite_rows(features, _valid(frame_lengths, features.shape[1])),
                _finite_rows(hidden, valid),
            )

        out_specs = (ROWS, self.family.states_spec(ROWS), ROWS, ROWS)
        run = self.rows.per_device(rows, (REPLICATED, ROWS, ROWS), out_specs)
        return run(values, features, frame_lengths)

    def _features_impl(self, waveforms, sample_lengths, hf_batch):
        self._traces += 1
        run = self.rows.per_device(lambda w, n: self.family.features(w, n, hf_batch), (ROWS, ROWS))
        return run(waveforms, sample_lengths)

    def _encode_impl(
        self, enc_values, proj_values, waveforms, sample_lengths, frame_lengths, hf_batch, with_projector, hidden_states
    ):
        self._traces += 1

        def rows(enc_values, proj_values, waveforms, sample_lengths, frame_lengths):
            features = self.family.features(waveforms, sample_lengths, hf_batch).astype(self._compute_dtype)
            hidden, states, valid = self._run_encoder(enc_values, features, frame_lengths, hidden_states)
            embeddings, ok = self._project_checked(proj_values, hidden, valid, frame_lengths, with_projector)
            return features, hidden, embeddings, states, ok

        out_specs = (ROWS, ROWS, ROWS, self.family.states_spec(ROWS), ROWS)
        run = self.rows.per_device(rows, (REPLICATED, REPLICATED, ROWS, ROWS, ROWS), out_specs)
        return run(enc_values, proj_values, waveforms, sample_lengths, frame_lengths)

    def _project_checked(self, proj_values, hidden, valid, frame_lengths, with_projector: bool):
        """(the projector's embeddings or None, whether each row's hidden states and embeddings are finite)."""
        ok = _finite_rows(hidden, valid)
        embeddings = None
        if with_projector:
            embeddings = self._projector.merge(proj_values)(hidden)
            counts = _embedding_counts(frame_lengths, self.projector_config)
            ok &= _finite_rows(embeddings, _valid(counts, embeddings.shape[1]))
        return embeddings, ok

    # -- one block per call (layerwise.py): begin, each block, end ---------------------------------------
    def _begin_impl(self, values, x, x_lengths, frame_lengths, hf_batch, waveforms, hidden_states):
        self._traces += 1  # one per input shape: the blocks' and the end's shapes follow from it
        fam = self.family

        def rows(values, x, x_lengths, frame_lengths):
            features = fam.features(x, x_lengths, hf_batch).astype(self._compute_dtype) if waveforms else x
            valid = _valid(frame_lengths, features.shape[1])
            model = self._encoder.merge(values)
            carry, aux = fam.begin(model, features, valid, self.chunk_blocks, hidden_states)
            return features, _finite_rows(features, valid), carry, aux

        out_specs = (ROWS, ROWS, fam.carry_spec(ROWS), ROWS)
        return self.rows.per_device(rows, (REPLICATED, ROWS, ROWS, ROWS), out_specs)(
            values, x, x_lengths, frame_lengths
        )

    def _block_impl(self, values, block_values, carry, aux, i, kind, hidden_states):
        fam = self.family

        def rows(values, block_values, carry, aux, i):
            model, block = self._encoder.merge(values), self._blocks.merge(kind[0], block_values)
            return fam.step(model, block, carry, aux, i, kind, self.chunk_blocks, hidden_states)

        spec = fam.carry_spec(ROWS)
        run = self.rows.per_device(rows, (REPLICATED, REPLICATED, spec, ROWS, REPLICATED), (spec, ROWS))
        return run(values, block_values, carry, aux, i)

    def _end_impl(self, values, proj_values, carry, aux, states, frame_lengths, with_projector, hidden_states):
        fam = self.family

        def rows(values, proj_values, carry, aux, states, frame_lengths):
            out = fam.end(self._encoder.merge(values), carry, aux, states, hidden_states)
            hidden, valid = out.last_hidden_state, out.valid
            embeddings, ok = self._project_checked(proj_values, hidden, valid, frame_lengths, with_projector)
            return hidden, embeddings, out.hidden_states, ok

        in_specs = (REPLICATED, REPLICATED, fam.carry_spec(ROWS), ROWS, ROWS, ROWS)
        out_specs = (ROWS, ROWS, fam.states_spec(ROWS), ROWS)
        return self.rows.per_device(rows, in_specs, out_specs)(values, proj_values, carry, aux, states, frame_lengths)

    def _layerwise(
        self, x, x_lengths, frame_lengths, *, hf_batch=False, waveforms=False, with_projector=False, hidden_states=False
    ):
        """(features, their rows' finiteness, hidden, embeddings, per-layer states, outputs' finiteness)."""
        values = self._encoder.values()
        flags = dict(hidden_states=hidden_states)
        features, finite_in, carry, aux = self._begin(
            values, x, x_lengths, frame_lengths, hf_batch=hf_batch, waveforms=waveforms, **flags
        )
        states = []
        for i, (kind, (_, block_values)) in enumerate(zip(self.family.block_kinds(), self._blocks.blocks, strict=True)):
            step = self._shrinking_block if kind[1] else self._block
            carry, own = step(values, block_values, carry, aux, np.int32(i), kind=kind, **flags)
            if own is not None:
                states.append(own)
        proj_values = self._projector.values() if with_projector else None
        hidden, emb, states, ok = self._end(
            values, proj_values, carry, aux, tuple(states), frame_lengths, with_projector=with_projector, **flags
        )
        return features, finite_in, hidden, emb, states, ok

    def _project_impl(self, values, hidden_states, frame_lengths):
        self._traces += 1

        def rows(values, h, frame_lengths):
            valid = _valid(frame_lengths, h.shape[1])
            finite_in = _finite_rows(h, valid)
            emb = self._projector.merge(values)(masked(h, valid))
            counts = _embedding_counts(frame_lengths, self.projector_config)
            return emb, finite_in, _finite_rows(emb, _valid(counts, emb.shape[1]))

        return self.rows.per_device(rows, (REPLICATED, ROWS, ROWS))(values, hidden_states, frame_lengths)

    def _ctc_impl(self, values, hidden_states, frame_lengths):
        self._traces += 1
        valid = _valid(frame_lengths, hidden_states.shape[1])
        logits = self.family.ctc_logits(self._encoder.merge(values), hidden_states)
        return logits, _finite_rows(hidden_states, valid), _finite_rows(logits, valid)

    @property
    def num_traces(self) -> int:
        """How many input shapes the compiled functions have been traced (and compiled, or fetched from the
        persistent compilation cache) for so far."""
        return self._traces

    num_compilations = num_traces  # the earlier name

    # -- shapes ------------------------------------------------------------------------------------------
    def bucket_frames(self, num_frames: int) -> int:
        """The padded length that an input of `num_frames` frames runs at."""
        c = self.config.context_size
        return self.buckets.frames_for(num_frames, c, self.chunk_blocks and self.chunk_blocks * c)

    def padded_batch(self, batch: int) -> int:
        """The batch size that `batch` rows run at: the next multiple of the number of devices."""
        return self.rows.padded_batch(batch)

    # -- features -> hidden states -----------------------------------------------------------------------
    def output_lengths(self, frames):
        """Output frames of `frames` input frames (the same for 4.x; halved per subsampling block for 5)."""
        return self.family.output_lengths(np.asarray(frames)).astype(np.int32)

    def encode_features(
        self,
        features: Float[Array, "b t f"] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> Float[Array, "b t w"] | tuple[Float[Array, "b t w"], Any]:
        """Encode features (B, T, input_dim) -> hidden states (B, T', output_width), T' = T for 4.x and
        `output_lengths(T)` for Speech 5.

        Without `lengths`: HF's encoder on the same batch (every row T frames long). With `lengths` (valid
        frames per row): row i equals row i encoded alone, unpadded; frames past a row's (output) length are
        zeros. A 2-D (T, input_dim) input gives a 2-D output. `output_hidden_states`: also every layer's
        output, as HF's `output_hidden_states` gives them (the input projection, then each block): stacked,
        (num_layers + 1, B, T, hidden_dim), for 4.x; a tuple for Speech 5, whose layers differ in length.
        """
        x, squeeze = inputs.feature_batch(features, self.config.input_dim)
        b, t, _ = x.shape
        lens = inputs.lengths(lengths, b, t, minimum=self._min_frames())
        x = jnp.pad(jnp.asarray(x, self._compute_dtype), ((0, 0), (0, self.bucket_frames(t) - t), (0, 0)))
        x, lens = self.rows.split_rows(x), self.rows.split_rows(lens, fill=self._min_frames())
        if self._blocks is not None:
            _, finite_in, out, _, states, finite_out = self._layerwise(
                x, lens, lens, hidden_states=output_hidden_states
            )
        else:
            out, states, finite_in, finite_out = self._forward(
                self._encoder.values(), x, lens, hidden_states=output_hidden_states
            )
        _check_finite(finite_in[:b], finite_out[:b], "features", "encoder output")
        to = int(self.output_lengths(t))
        out = out[0, :to] if squeeze else out[:b, :to]
        if not output_hidden_states:
            return out
        return out, self._cut_states(states, b, t, squeeze)

    def _min_frames(self) -> int:
        """The fewest input frames a row may have (Speech 5: every subsampling block needs two)."""
        return getattr(self.config, "subsampling", 1)

    def _cut_states(self, states, b: int, t: int, squeeze: bool = False):
        """Per-layer states cut back from the bucket and the padded batch."""
        if isinstance(self.family, Granite4):
            return states[:, 0, :t] if squeeze else states[:, :b, :t]
        lengths, n = [t], t  # Speech 5: the input projection at T, then each block at its resolution
        for i in range(self.config.num_hidden_layers):
            n = n // 2 if i in self.config.subsample_layers else n
            lengths.append(n)
        return tuple(s[0, :m] if squeeze else s[:b, :m] for s, m in zip(states, lengths, strict=True))

    # -- hidden states -> LLM embeddings, CTC --------------------------------------------------------------
    def audio_embeddings(
        self, hidden_states: Float[Array, "b t w"] | np.ndarray, lengths: Sequence[int] | np.ndarray | None = None
    ) -> tuple[Float[Array, "b e l"], np.ndarray]:
        """The projector on encoder hidden states: (embeddings (B, E, llm_hidden_size), valid count per row).

        Equals HF `get_audio_features(...).pooler_output` on the same hidden states. With `lengths`, hidden
        frames past each row's length are treated as zeros (what `encode_features` returns there), so row i
        equals row i alone.
        """
        if self.projector is None:
            raise ValueError("this checkpoint has no projector (a bare encoder); audio_embeddings needs one")
        h, squeeze = inputs.feature_batch(hidden_states, self.config.output_width, "hidden_states", "output_width")
        b, t, _ = h.shape
        lens = inputs.lengths(lengths, b, t)
        w = self.projector_config.window_size
        tb = -(-self.bucket_frames(t) // w) * w  # bucketed, whole windows
        h = jnp.pad(jnp.asarray(h, self._compute_dtype), ((0, 0), (0, tb - t), (0, 0)))
        emb, finite_in, finite_out = self._project(
            self._projector.values(), self.rows.split_rows(h), self.rows.split_rows(lens, fill=1)
        )
        _check_finite(finite_in[:b], finite_out[:b], "hidden_states", "projector output")
        emb, counts = (
            emb[:b, : num_audio_embeddings(t, self.projector_config)],
            num_audio_embeddings(lens, self.projector_config),
        )
        return (emb[0], counts[0]) if squeeze else (emb, counts)

    def ctc_logits(self, hidden_states: Float[Array, "b t w"] | np.ndarray) -> Float[Array, "b t v"]:
        """The CTC head on the final layer's hidden states: (B, T, output_dim) logits (4.x: `out`; Speech 5:
        `ctc_head`, which is `out` when tied)."""
        h, squeeze = inputs.feature_batch(hidden_states, self.config.output_width, "hidden_states", "output_width")
        b, t = h.shape[:2]
        h = jnp.pad(jnp.asarray(h, self._compute_dtype), ((0, 0), (0, self.bucket_frames(t) - t), (0, 0)))
        out, finite_in, finite_out = self._ctc(self._encoder.values(), h, np.full(b, t, np.int32))
        _check_finite(finite_in, finite_out, "hidden_states", "CTC logits")
        out = out[:, :t]
        return out[0] if squeeze else out

    def ctc_greedy(
        self,
        hidden_states: Float[Array, "b t w"] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        id_to_text: Callable[[int], str] = chr,
    ) -> list[str]:
        """Greedy CTC transcripts of encoder hidden states: `ctc_decode` of the per-frame argmax.

        4.x: `id_to_text` maps each emitted id (default `chr`); Speech 5: the BPE tokenizer (it does not apply).
        """
        ids = jnp.argmax(self.ctc_logits(hidden_states), axis=-1)
        return self.ctc_decode(np.asarray(ids).reshape(-1, ids.shape[-1]), lengths, id_to_text=id_to_text)

    def ctc_decode(
        self,
        ids: np.ndarray | jax.Array,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        id_to_text: Callable[[int], str] = chr,
    ) -> list[str]:
        """Per-frame best ids (B, T') with `lengths` valid frames -> text per row, collapsed once."""
        rows = ctc_greedy_ids(ids, lengths, blank=self.family.blank)
        if isinstance(self.family, Granite5):
            return [self.family.text(r) for r in rows]
        return ["".join(id_to_text(i) for i in r) for r in rows]

    # -- audio -> features, -> everything --------------------------------------------------------------------
    def _waveform_batch(self, waveforms: Any, sampling_rate: float, hf: bool) -> WaveformBatch:
        """Validated waveforms, zero-padded to the largest sample count of their frame bucket."""
        fam = self.family
        waves = prepare_waveforms(waveforms, sampling_rate, self.feature_config, minimum=fam.min_samples())
        n = np.array([len(w) for w in waves], np.int32)
        frames = np.asarray(fam.frames(n)).astype(np.int32)
        samples = pad_rows(waves, fam.samples_for_frames(self.bucket_frames(int(frames.max()))))
        # HF mode: every row is as long as the longest (zeros inside)
        return WaveformBatch(samples, np.full_like(n, n.max()) if hf else n, frames)

    def _split(self, batch: WaveformBatch, hf: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The batch over the devices. Dummy rows are silence of one frame; in HF mode as long as the others,
        so that each device's own maximum (log_mel's hf_batch) is the batch's."""
        dummy = int(batch.sample_lengths.max()) if hf else self.family.min_samples()
        t = int(batch.frames.max())
        # HF mode, 4.x: its encoder has no mask and sees every frame; Speech 5's takes the extractor's mask
        frames = np.full_like(batch.frames, t) if hf and not self.family.masks_padding else batch.frames
        return (
            self.rows.split_rows(batch.samples),
            self.rows.split_rows(batch.sample_lengths, fill=dummy),
            self.rows.split_rows(frames, fill=1),
        )

    def extract_features(
        self, waveforms: Any, sampling_rate: float = 16000, *, batch_mode: str = "per_utterance"
    ) -> tuple[jax.Array, np.ndarray]:
        """The checkpoint's front end: waveforms -> (features (B, T, input_dim), lengths (B,) int32 frames).

        Like `granite_jax.extract_features`, with this checkpoint's feature settings and buckets.
        """
        hf = _batch_mode(batch_mode)
        batch = self._waveform_batch(waveforms, sampling_rate, hf)
        samples, sample_lengths, _ = self._split(batch, hf)
        features = self._features(samples, sample_lengths, hf_batch=hf)
        return features[: len(batch.frames), : int(batch.frames.max())], batch.frames

    def encode(
        self,
        waveforms: Any,
        sampling_rate: float = 16000,
        *,
        batch_mode: str = "per_utterance",
        embeddings: bool = True,
        output_hidden_states: bool = False,
    ) -> EncodeResult:
        """Audio -> log-mel -> encoder -> projector, compiled: one call, or layerwise (what `load` builds) the
        front end, one compiled block per block, and the outputs.

        `waveforms`: one 1-D float array, a list of them (any lengths; (1, N) arrays count as mono) or a 2-D
        (batch, samples) array, at `sampling_rate` (resampled to the checkpoint's rate when different).
        `batch_mode`: "per_utterance" (each row exactly as if encoded alone) or "hf" (what transformers'
        feature extractor and encoder give on the zero-padded batch). `embeddings=False` skips the projector.
        `output_hidden_states`: also every layer's output (`EncodeResult.layer_hidden_states`).
        """
        hf = _batch_mode(batch_mode)
        if self.config.input_dim != self.feature_config.feature_dim:
            raise ValueError(
                f"this encoder takes input_dim={self.config.input_dim} features, not the "
                f"{self.feature_config.feature_dim} of its log-mel front end: use encode_features"
            )
        batch = self._waveform_batch(waveforms, sampling_rate, hf)
        with_projector = embeddings and self.projector is not None
        flags = dict(hf_batch=hf, with_projector=with_projector, hidden_states=output_hidden_states)
        if self._blocks is not None:
            features, _, hidden, emb, states, finite = self._layerwise(*self._split(batch, hf), waveforms=True, **flags)
        else:
            proj_values = self._projector.values() if with_projector else None
            features, hidden, emb, states, finite = self._encode(
                self._encoder.values(), proj_values, *self._split(batch, hf), **flags
            )
        b, t = len(batch.frames), int(batch.frames.max())
        _check_finite(np.ones(b, bool), finite[:b], "waveforms", "encoder or projector output")
        pcfg = self.projector_config
        out_lengths = self.output_lengths(batch.frames)
        return EncodeResult(
            features[:b, :t],
            hidden[:b, : int(self.output_lengths(t))],
            out_lengths,
            emb[:b, : num_audio_embeddings(t, pcfg)] if with_projector else None,
            num_audio_embeddings(batch.frames, pcfg) if with_projector else None,
            self._cut_states(states, b, t) if output_hidden_states else None,
            batch.frames,
        )

    def transcribe(
        self,
        waveforms_or_paths: Any,
        sampling_rate: float = 16000,
        *,
        batch_mode: str = "per_utterance",
        timestamps: bool = False,
    ) -> list[str] | list[Transcript]:
        """Greedy CTC text of each utterance: waveforms (as `encode` takes them) or audio file paths.

        Speech 5: equal to `processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)`.
        4.x: the CTC head's greedy characters (`chr(id)`), which the released models train as an auxiliary
        head (their transcripts come from the language model). `timestamps`: `Transcript`s instead, with
        each token's and word's start and end from the CTC alignment (one output frame is
        `frame_seconds`: 80 ms for Speech 5, 20 ms for 4.x).
        """
        items = inputs.utterances(waveforms_or_paths, "waveforms_or_paths")
        single = isinstance(items, (str, os.PathLike))
        if single:
            items = [items]
        if isinstance(items, (list, tuple)) and items and all(isinstance(x, (str, os.PathLike)) for x in items):
            from granite_jax.audio import load_audio

            sampling_rate = self.feature_config.sampling_rate
            items = [load_audio(p, sampling_rate) for p in items]
        res = self.encode(items, sampling_rate, batch_mode=batch_mode, embeddings=False)
        if not timestamps:
            texts = self.ctc_greedy(res.hidden_states, res.lengths)
            return texts[0] if single else texts
        ids = np.asarray(jnp.argmax(self.ctc_logits(res.hidden_states), axis=-1))
        out = [self.family.align(ids[i, :n]) for i, n in enumerate(res.lengths)]
        return out[0] if single else out

    @property
    def frame_seconds(self) -> float:
        """Seconds of audio per output frame."""
        return self.family.frame_seconds

    def _num_encoder_values(self) -> int:
        return self._encoder.num_values() + (self._blocks.num_values() if self._blocks is not None else 0)

    def __repr__(self) -> str:
        c = self.config
        if isinstance(self.family, Granite5):
            return (
                f"Runner(Granite Speech 5: {c.num_hidden_layers} layers x {c.hidden_size}, {c.num_attention_heads} "
                f"heads x {c.head_dim}, context {c.context_size}, subsampling x{c.subsampling}, vocabulary "
                f"{c.vocab_size}, {self._num_encoder_values() / 1e6:.1f}M values, {self._compute_dtype}, "
                f"{len(self.devices)} device(s))"
            )
        proj = ""
        if self._projector is not None:
            p = self.projector_config
            m = self._projector.num_values()
            proj = f", projector {p.num_hidden_layers} x {p.hidden_size} -> {p.llm_hidden_size} ({m / 1e6:.1f}M)"
        return (
            f"Runner({c.num_layers} layers x {c.hidden_dim}, {c.num_heads} heads x {c.dim_head}, "
            f"context {c.context_size}, {self._num_encoder_values() / 1e6:.1f}M values{proj}, "
            f"{self._compute_dtype}, buckets={self.buckets.mode!r}, {len(self.devices)} device(s))"
        )


GraniteEncoder = Runner  # the earlier name


def _valid(lengths: jax.Array, t: int) -> jax.Array:
    """(B, t) mask of the first `lengths[i]` frames of each row."""
    return jnp.arange(t)[None, :] < lengths[:, None]


def _finite_rows(x: jax.Array, valid: jax.Array) -> jax.Array:
    """(B,) whether each row of x is finite in its valid frames (what padding holds does not matter)."""
    return jnp.all(jnp.isfinite(x) | ~valid[..., None], axis=(1, 2))


def _embedding_counts(frame_lengths: jax.Array, pcfg: ProjectorConfig) -> jax.Array:
    return -(-frame_lengths // pcfg.window_size) * pcfg.num_queries


def _check_finite(finite_in: Any, finite_out: Any, what_in: str, what_out: str) -> None:
    """The one policy for non-finite values: a non-finite input is named; so is a finite input whose result
    overflows float32 (or meets non-finite weights). Nothing non-finite is ever returned."""
    finite_in, finite_out = np.asarray(finite_in), np.asarray(finite_out)
    bad = np.flatnonzero(~finite_in).tolist()
    if bad:
        raise ValueError(f"{what_in} row(s) {bad} hold NaN or infinite values in their valid frames")
    bad = np.flatnonzero(~finite_out).tolist()
    if bad:
        raise ValueError(
            f"the {what_out} of row(s) {bad} is not finite although the {what_in} are: values of this magnitude "
            "overflow float32 in the model (log-mel features lie within about [-2, 4]; samples in [-1, 1]), or "
            "the checkpoint's weights hold NaN or infinite values"
        )


def _check_chunk_blocks(chunk_blocks: Any) -> None:
    if chunk_blocks is None:
        return
    if isinstance(chunk_blocks, bool) or not isinstance(chunk_blocks, int) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive integer or None, got {chunk_blocks!r}")


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return d


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    buckets: str | Sequence[int] | BucketPolicy = "auto",
    chunk_blocks: int | None = 8,
    devices: DeviceSpec = None,
) -> Runner:
    """Load an encoder (and its projector) from a granite-jax-convert directory, or convert an HF one in memory.

    `path`: a granite_jax checkpoint, an HF checkpoint directory, or a hub id (downloaded if online).
    `dtype`: parameter and compute dtype ("float32" default); stored parameters are cast to it.
    `buckets`: padded-length policy, see `BucketPolicy`. `chunk_blocks`: each layer works through the
    batch in tiles of about this many blocks' frames (8 x 200 = 1600 by default): cache-sized intermediates
    (faster on CPU) and memory that grows only with the hidden states, however long the audio or large the
    batch. None never tiles (one pass over the whole batch: more memory, slower on CPU).
    `devices`: see `Runner`. Every argument is checked before any weight is read.
    """
    param_dtype = _float_dtype(dtype)
    devices = resolve_devices(devices)
    BucketPolicy.make(buckets)
    _check_chunk_blocks(chunk_blocks)
    path = os.fspath(path)
    loaded = checkpoint.load(path) if checkpoint.is_checkpoint(path) else convert_hf(path)
    # Converted in memory: hand each array over and drop it, so the weights are held once.
    consume = isinstance(loaded.params, dict)
    build = speech5.encoder_from_params if isinstance(loaded.config, Speech5Config) else encoder_from_params
    parts: dict = {}  # each block's weights as arrays of their own, for the layerwise runner
    model = build(
        loaded.config, loaded.params, param_dtype=param_dtype, dtype=param_dtype, consume=consume, unstacked=parts
    )
    tokenizer = None
    if "tokenizer.json" in loaded.files:
        tokenizer = CTCTokenizer.from_dir(os.path.dirname(loaded.files["tokenizer.json"]), loaded.config.pad_token_id)
    projector = None
    if loaded.projector_config is not None:
        projector = projector_from_params(
            loaded.projector_config, loaded.projector_params, param_dtype=param_dtype, dtype=param_dtype
        )
    return Runner(
        model,
        projector=projector,
        feature_config=loaded.feature_config,
        tokenizer=tokenizer,
        buckets=buckets,
        chunk_blocks=chunk_blocks,
        provenance=loaded.provenance,
        devices=devices,
        layerwise=BlockWeights(model, parts) if parts else False,
    )

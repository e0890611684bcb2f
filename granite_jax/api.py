"""What `granite_jax.load` returns: a converted encoder behind one jit boundary, with length buckets."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float

from granite_jax import checkpoint
from granite_jax.config import EncoderConfig
from granite_jax.features import FeatureConfig, log_mel, min_samples, num_encoder_frames, prepare_waveforms
from granite_jax.modeling import GraniteSpeechEncoder, encoder_from_params
from granite_jax.projector import GraniteSpeechProjector, num_audio_embeddings, projector_from_params


def _ladder_frames(t: int, per_octave: int = 8) -> int:
    """Smallest m * 2^e >= t with per_octave <= m < 2 * per_octave: 8, 9, ..., 15, 16, 18, ..., 30, 32, 36, ...

    At most 1/per_octave padding (about half that on average), and per_octave compiles per doubling.
    """
    e = max(0, (t - 1).bit_length() - per_octave.bit_length())
    m = -(-t // (1 << e))
    while m >= 2 * per_octave:  # rounding up crossed into the next octave
        e += 1
        m = -(-t // (1 << e))
    return max(m, per_octave) << e


@dataclass(frozen=True)
class BucketPolicy:
    """Which padded length T is compiled for an input of `t` frames.

    - "auto" (default): the next of 8, 9, ..., 15, 16, 18, ..., 30, 32, 36, ... frames (8 steps per
      doubling): at most 12.5% padding, about 4% on average, and a stream of lengths up to N frames
      compiles at most about 8 log2(N / 8) times. Rows longer than one tile (`chunk_blocks`) are cut
      into whole blocks, so there the ladder counts blocks: 30 blocks (120 s) run as 30.
    - "block": the next multiple of context_size (one compile per block count).
    - a sequence of frame counts: the smallest that fits; longer inputs fall back to "auto".
    Padding is exact: padded frames are masked, so the result does not depend on the bucket.
    """

    mode: str | tuple[int, ...] = "auto"

    @classmethod
    def make(cls, spec: str | Sequence[int] | BucketPolicy, context_size: int) -> BucketPolicy:
        if isinstance(spec, BucketPolicy):
            return spec
        if isinstance(spec, str):
            if spec not in ("auto", "block"):
                raise ValueError(f"buckets must be 'auto', 'block' or a list of frame counts, got {spec!r}")
            return cls(spec)
        frames = tuple(sorted(int(f) for f in spec))
        bad = [f for f in frames if f <= 0]
        if not frames or bad:
            raise ValueError(f"bucket sizes must be positive frame counts, got {bad or frames}")
        return cls(frames)

    def frames_for(self, t: int, context_size: int, tile_frames: int | None = None) -> int:
        if isinstance(self.mode, tuple):
            for f in self.mode:
                if f >= t:
                    return f
        if self.mode == "block":
            return math.ceil(t / context_size) * context_size
        if tile_frames is not None and t > tile_frames:  # tiled rows are cut into whole blocks: ladder of blocks
            return _ladder_frames(math.ceil(t / context_size)) * context_size
        return _ladder_frames(t)


class _Bound:
    """An NNX module split once into its graph and its Variables, for use under `jax.jit`.

    Reading the Variables' values per call costs microseconds (nnx.state walks the whole graph: ~20 ms
    at production size) and still sees every update to them (fine-tuning). Replacing submodules needs
    a new `GraniteEncoder`.
    """

    def __init__(self, module: nnx.Module):
        self.module = module
        graphdef, state = nnx.split(module)
        self.graphdef = graphdef
        self.variables = nnx.to_flat_state(state)

    def values(self) -> list[jax.Array]:
        return [v.get_value() for _, v in self.variables]

    def place(self, sharding: jax.sharding.Sharding) -> None:
        """Put every Variable's value (the module's own Variables) on `sharding`."""
        for _, v in self.variables:
            v.set_value(jax.device_put(v.get_value(), sharding))

    def merge(self, values) -> nnx.Module:
        pairs = [(p, v.replace(x)) for (p, v), x in zip(self.variables, values, strict=True)]
        return nnx.merge(self.graphdef, nnx.from_flat_state(pairs))


@dataclass
class EncodeResult:
    """What `GraniteEncoder.encode` returns; row i is utterance i, padded to the longest.

    `features` (B, T, 160) log-mel input and `hidden_states` (B, T, output_width) with `lengths` valid
    frames per row (zeros after); `audio_embeddings` (B, E, llm_hidden_size), the projector output that
    Granite Speech feeds its language model, with `embedding_counts` valid rows each (HF's
    audio_embed_sizes); None when the checkpoint has no projector.
    """

    features: jax.Array
    hidden_states: jax.Array
    lengths: np.ndarray
    audio_embeddings: jax.Array | None = None
    embedding_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def utterance(self, i: int) -> dict[str, np.ndarray]:
        """Utterance i's valid rows as numpy arrays (hidden_states, and audio_embeddings if any)."""
        out = {"hidden_states": np.asarray(self.hidden_states[i, : self.lengths[i]])}
        if self.audio_embeddings is not None:
            out["audio_embeddings"] = np.asarray(self.audio_embeddings[i, : self.embedding_counts[i]])
        return out


def ctc_greedy_decode(
    ids: np.ndarray | jax.Array,
    lengths: Sequence[int] | np.ndarray | None = None,
    *,
    id_to_text: Callable[[int], str] = chr,
    blank: int = 0,
) -> list[str]:
    """Greedy CTC: per row, collapse repeated ids, drop `blank`, map the rest with `id_to_text`.

    `ids` (B, T) best ids per frame (argmax of `ctc_logits`); `lengths` valid frames per row.
    The Granite 4.x character heads map an id to `chr(id)`, the default.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be (batch, frames), got shape {ids.shape}")
    lens = [ids.shape[1]] * ids.shape[0] if lengths is None else [int(n) for n in lengths]
    texts = []
    for row, n in zip(ids, lens, strict=True):
        row = row[:n]
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        texts.append("".join(id_to_text(int(i)) for i in row[keep & (row != blank)]))
    return texts


def _resolve_devices(devices) -> list[jax.Device]:
    """`devices=` of `GraniteEncoder` / `load` -> a non-empty list of distinct devices local to this process."""
    local = jax.local_devices()
    if devices is None:
        return list(local)
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={devices!r}: this process has {len(local)} local device(s); pass 1..{len(local)}"
            )
        return list(local[: int(devices)])
    if isinstance(devices, jax.Device):
        devices = [devices]
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence | np.ndarray):
        raise ValueError(f"devices must be None, a device count or a list of jax devices, got {devices!r}")
    devs = list(devices)
    if not devs:
        raise ValueError("devices must not be empty")
    bad = [d for d in devs if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"devices must be jax devices (e.g. from jax.local_devices()), got {bad!r}")
    if len(set(devs)) != len(devs):
        raise ValueError(f"devices must be distinct, got {devs!r}")
    remote = [d for d in devs if d not in local]
    if remote:
        raise ValueError(f"devices must be local to this process (jax.local_devices()), got {remote!r}")
    return devs


class GraniteEncoder:
    """A Granite Speech encoder (and projector, when the checkpoint has one) ready to run under `jax.jit`.

    - `encode(waveforms)`: audio -> log-mel -> encoder -> projector, in one compiled call.
    - `encode_features(features, lengths)`: log-mel -> encoder hidden states.
    - `audio_embeddings(hidden_states, lengths)`: the projector (what Granite feeds its LLM).
    - `ctc_logits(hidden_states)` and `ctc_greedy(...)`: the CTC head.
    `model` (and `projector`) are the NNX modules, for probing or fine-tuning.

    `devices`: where it runs; None (default) = all of `jax.local_devices()`, an int = the first that many,
    or a list of local devices. The parameters are replicated on them once, here: the modules' own
    Variables, so values set later must stay so placed (`NamedSharding(self.mesh, PartitionSpec())`), and
    of two GraniteEncoders on one module the later one's devices win. `encode`, `encode_features` and
    `audio_embeddings` split the batch (leading axis) over a 1-D mesh with axis "batch", padding it to a
    multiple of the device count with dummy rows that are dropped again. The result is the same as on
    one device; it stays sharded when the batch is a multiple of the device count (else the rows are
    gathered: a jax.Array cannot split 3 rows over 4 devices).
    """

    def __init__(
        self,
        model: GraniteSpeechEncoder,
        *,
        projector: GraniteSpeechProjector | None = None,
        feature_config: FeatureConfig | None = None,
        buckets: str | Sequence[int] | BucketPolicy = "auto",
        chunk_blocks: int | None = 8,
        provenance: dict | None = None,
        devices: int | Sequence[jax.Device] | None = None,
    ):
        self.devices = _resolve_devices(devices)
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharded = NamedSharding(self.mesh, PartitionSpec("batch"))
        self.model = model
        self.config: EncoderConfig = model.config
        self.projector = projector
        self.projector_config = projector.config if projector is not None else None
        self.feature_config = feature_config or FeatureConfig()
        self.buckets = BucketPolicy.make(buckets, self.config.context_size)
        if chunk_blocks is not None and (not isinstance(chunk_blocks, int) or chunk_blocks < 1):
            raise ValueError(f"chunk_blocks must be a positive integer or None, got {chunk_blocks!r}")
        self.chunk_blocks = chunk_blocks
        self.provenance = dict(provenance or {})
        self._compute_dtype = jnp.dtype(model.input_linear.kernel.get_value().dtype)
        self._encoder = _Bound(model)
        self._projector = _Bound(projector) if projector is not None else None
        for bound in (self._encoder, self._projector):
            if bound is not None:
                bound.place(self._replicated)  # once; zero-copy when already on the one device
        self._traces = 0
        # Inputs arrive split over the mesh (`_shard`), the parameters replicated: each device runs its rows.
        by_rows = self._batch_sharded
        self._forward = jax.jit(self._forward_impl, out_shardings=by_rows)
        self._encode = jax.jit(self._encode_impl, static_argnames=("hf_batch", "with_projector"), out_shardings=by_rows)
        self._project = jax.jit(self._project_impl, out_shardings=by_rows)
        self._ctc = jax.jit(self._ctc_impl)

    # -- the compiled functions (each runs once per trace: per compiled shape) ----------------------------
    def _per_device(self, fn: Callable, num_params: int, num_rows: int) -> Callable:
        """`fn(*params, *rows)` run by each device on its own rows (`jax.shard_map`); `fn` itself on one device.

        Not left to the partitioner: the encoder's tiling loops slice the batch axis, which it would gather.
        """
        if len(self.devices) == 1:
            return fn
        rows = PartitionSpec("batch")
        specs = (PartitionSpec(),) * num_params + (rows,) * num_rows
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs, out_specs=rows, check_vma=False)

    def _run_encoder(self, values, features, frame_lengths):
        valid = jnp.arange(features.shape[1])[None, :] < frame_lengths[:, None]
        return self._encoder.merge(values)(features, valid, chunk_blocks=self.chunk_blocks)

    def _forward_impl(self, values, features, lengths):
        self._traces += 1
        return self._per_device(self._run_encoder, 1, 2)(values, features, lengths)

    def _encode_impl(self, enc_values, proj_values, waveforms, sample_lengths, frame_lengths, hf_batch, with_projector):
        self._traces += 1

        def rows(enc_values, proj_values, waveforms, sample_lengths, frame_lengths):
            features = log_mel(waveforms, sample_lengths, self.feature_config, hf_batch=hf_batch)
            features = features.astype(self._compute_dtype)
            hidden = self._run_encoder(enc_values, features, frame_lengths)
            embeddings = self._projector.merge(proj_values)(hidden) if with_projector else None
            return features, hidden, embeddings

        return self._per_device(rows, 2, 3)(enc_values, proj_values, waveforms, sample_lengths, frame_lengths)

    def _project_impl(self, values, hidden_states):
        self._traces += 1
        return self._per_device(lambda values, h: self._projector.merge(values)(h), 1, 1)(values, hidden_states)

    def _ctc_impl(self, values, hidden_states):
        self._traces += 1
        final = hidden_states[..., -self.config.hidden_dim :]  # plus: the last layer comes last
        return self._encoder.merge(values).out(final)

    @property
    def num_compilations(self) -> int:
        """How many input shapes the compiled functions have been traced for so far."""
        return self._traces

    def bucket_frames(self, num_frames: int) -> int:
        """The padded length that an input of `num_frames` frames runs at."""
        c = self.config.context_size
        return self.buckets.frames_for(num_frames, c, self.chunk_blocks and self.chunk_blocks * c)

    def padded_batch(self, batch: int) -> int:
        """The batch size that `batch` rows run at: the next multiple of the number of devices."""
        n = len(self.devices)
        return -(-batch // n) * n

    def _shard(self, x: np.ndarray | jax.Array, fill=0) -> jax.Array:
        """Split rows (leading axis) over the mesh; numpy rows are first padded with `fill` to `padded_batch`."""
        if isinstance(x, np.ndarray):
            extra = self.padded_batch(x.shape[0]) - x.shape[0]
            x = np.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return jax.device_put(x, self._batch_sharded)

    # -- features -> hidden states -----------------------------------------------------------------------
    def encode_features(
        self, features: Float[Array, "b t f"] | np.ndarray, lengths: Sequence[int] | np.ndarray | None = None
    ) -> Float[Array, "b t w"]:
        """Encode log-mel features (B, T, input_dim) -> hidden states (B, T, output_width).

        Without `lengths`: HF `GraniteSpeechCTCEncoder(features).last_hidden_state` on the same batch.
        With `lengths` (valid frames per row): row i equals row i encoded alone, unpadded; frames past a
        row's length are zeros. A 2-D (T, input_dim) input gives a 2-D output.
        """
        x = features if isinstance(features, jax.Array) else np.asarray(features)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"features must be (batch, frames, {self.config.input_dim}), got shape {x.shape}")
        b, t, f = x.shape
        if f != self.config.input_dim:
            raise ValueError(
                f"features have {f} channels per frame; this encoder takes input_dim={self.config.input_dim}"
            )
        if t == 0 or b == 0:
            raise ValueError(f"features must have at least one frame and one row, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"features must be a floating-point array, got {x.dtype}")
        lens = _check_lengths(lengths, b, t)
        tb = self.bucket_frames(t)
        # dummy rows (zeros, length 1) fill the batch up to a multiple of the device count
        x = jnp.pad(jnp.asarray(x, self._compute_dtype), ((0, self.padded_batch(b) - b), (0, tb - t), (0, 0)))
        out = self._forward(self._encoder.values(), self._shard(x), self._shard(lens, fill=1))
        out = out[:b, :t]
        return out[0] if squeeze else out

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
        h = hidden_states if isinstance(hidden_states, jax.Array) else np.asarray(hidden_states)
        if h.ndim != 3 or h.shape[-1] != self.config.output_width:
            raise ValueError(f"hidden_states must be (batch, frames, {self.config.output_width}), got shape {h.shape}")
        b, t, _ = h.shape
        lens = _check_lengths(lengths, b, t)
        w = self.projector_config.window_size
        tb = -(-self.bucket_frames(t) // w) * w  # bucketed, whole windows
        h = jnp.asarray(h, self._compute_dtype)
        h = jnp.where(jnp.arange(t)[None, :, None] < jnp.asarray(lens)[:, None, None], h, 0)
        h = jnp.pad(h, ((0, self.padded_batch(b) - b), (0, tb - t), (0, 0)))
        counts = num_audio_embeddings(lens, self.projector_config)
        emb = self._project(self._projector.values(), self._shard(h))
        return emb[:b, : num_audio_embeddings(t, self.projector_config)], counts

    def ctc_logits(self, hidden_states: Float[Array, "b t w"] | np.ndarray) -> Float[Array, "b t v"]:
        """The CTC head (`out`) on the final layer's hidden states: (B, T, output_dim) logits."""
        h = hidden_states if isinstance(hidden_states, jax.Array) else np.asarray(hidden_states)
        if h.shape[-1] != self.config.output_width:
            raise ValueError(f"hidden_states must end in {self.config.output_width} channels, got shape {h.shape}")
        return self._ctc(self._encoder.values(), jnp.asarray(h, self._compute_dtype))

    def ctc_greedy(
        self,
        hidden_states: Float[Array, "b t w"] | np.ndarray,
        lengths: Sequence[int] | np.ndarray | None = None,
        *,
        id_to_text: Callable[[int], str] = chr,
    ) -> list[str]:
        """Greedy CTC transcripts of encoder hidden states (see `ctc_greedy_decode`)."""
        ids = jnp.argmax(self.ctc_logits(hidden_states), axis=-1)
        return ctc_greedy_decode(np.asarray(ids), lengths, id_to_text=id_to_text)

    # -- audio -> everything ------------------------------------------------------------------------------
    def encode(
        self,
        waveforms,
        sampling_rate: int = 16000,
        *,
        batch_mode: str = "per_utterance",
        embeddings: bool = True,
    ) -> EncodeResult:
        """Audio -> log-mel -> encoder -> projector in one compiled call.

        `waveforms`: one 1-D float array, a list of them (any lengths) or a 2-D array (equal lengths),
        at `sampling_rate` (resampled to 16 kHz when different). `batch_mode`: "per_utterance" (each
        row exactly as if encoded alone) or "hf" (what transformers' feature extractor and encoder give
        on the zero-padded batch). `embeddings=False` skips the projector.
        """
        if batch_mode not in ("per_utterance", "hf"):
            raise ValueError(f"batch_mode must be 'per_utterance' or 'hf', got {batch_mode!r}")
        fc = self.feature_config
        if self.config.input_dim != fc.feature_dim:
            raise ValueError(
                f"this encoder takes input_dim={self.config.input_dim} features, not the {fc.feature_dim} of a "
                "log-mel front end: use encode_features"
            )
        waves = prepare_waveforms(waveforms, sampling_rate, fc)
        n = np.array([len(w) for w in waves])
        frames = num_encoder_frames(n, fc)
        t = int(frames.max())
        tb = self.bucket_frames(t)
        samples = (2 * tb + 1) * fc.hop_length - 1  # the most samples that give tb frames: every n that fits
        batch = np.zeros((len(waves), samples), np.float32)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
        hf = batch_mode == "hf"
        # HF mode: every row is as long as the longest (zeros inside), and the encoder sees all its frames.
        sample_lengths = np.full_like(n, n.max()) if hf else n
        frame_lengths = np.full_like(frames, t) if hf else frames
        with_projector = embeddings and self.projector is not None
        # Dummy rows: silence of the shortest length (one frame); in HF mode as long as the others, so that
        # each device's own maximum (log_mel's hf_batch) is the batch's.
        b = len(waves)
        dummy_samples = int(n.max()) if hf else min_samples(fc)
        features, hidden, emb = self._encode(
            self._encoder.values(),
            self._projector.values() if with_projector else None,
            self._shard(batch),
            self._shard(sample_lengths.astype(np.int32), fill=dummy_samples),
            self._shard(frame_lengths.astype(np.int32), fill=1),
            hf_batch=hf,
            with_projector=with_projector,
        )
        result = EncodeResult(features[:b, :t], hidden[:b, :t], frames.astype(np.int32))
        if with_projector:
            counts = num_audio_embeddings(frames, self.projector_config)
            result.audio_embeddings = emb[:b, : num_audio_embeddings(t, self.projector_config)]
            result.embedding_counts = counts
        return result

    def __repr__(self) -> str:
        c = self.config
        n = sum(int(np.prod(x.shape)) for x in self._encoder.values())
        proj = ""
        if self._projector is not None:
            p = self.projector_config
            m = sum(int(np.prod(x.shape)) for x in self._projector.values())
            proj = f", projector {p.num_hidden_layers} x {p.hidden_size} -> {p.llm_hidden_size} ({m / 1e6:.1f}M)"
        return (
            f"GraniteEncoder({c.num_layers} layers x {c.hidden_dim}, {c.num_heads} heads x {c.dim_head}, "
            f"context {c.context_size}, {n / 1e6:.1f}M values{proj}, {self._compute_dtype}, "
            f"buckets={self.buckets.mode!r})"
        )


def _check_lengths(lengths, b: int, t: int) -> np.ndarray:
    """(b,) int32 valid frames per row, each in [1, t]; all t when None."""
    if lengths is None:
        return np.full((b,), t, np.int32)
    lens = np.asarray(lengths)
    if lens.shape != (b,) or not np.issubdtype(lens.dtype, np.integer):
        raise ValueError(f"lengths must be {b} integers (one per row), got {lengths!r}")
    if lens.min() < 1 or lens.max() > t:
        raise ValueError(f"lengths must lie in [1, {t}] (the number of frames), got {lens.tolist()}")
    return lens.astype(np.int32)


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    buckets: str | Sequence[int] | BucketPolicy = "auto",
    chunk_blocks: int | None = 8,
    devices: int | Sequence[jax.Device] | None = None,
) -> GraniteEncoder:
    """Load an encoder (and its projector) from a granite-jax-convert directory, or convert an HF one in memory.

    `path`: a granite_jax checkpoint, an HF checkpoint directory, or a hub id (downloaded if online).
    `dtype`: parameter and compute dtype ("float32" default); stored parameters are cast to it.
    `buckets`: padded-length policy, see `BucketPolicy`. `chunk_blocks`: each layer works through the
    batch in tiles of about this many blocks' frames (8 x 200 = 1600 by default): cache-sized intermediates
    (faster on CPU) and memory that grows only with the hidden states, however long the audio or large the
    batch. None never tiles (one pass over the whole batch: more memory, slower on CPU).
    `devices`: see `GraniteEncoder`.
    """
    devices = _resolve_devices(devices)  # fail before reading the weights
    path = os.fspath(path)
    if checkpoint.is_checkpoint(path):
        loaded = checkpoint.load(path)
    else:
        from granite_jax.convert.convert import convert_hf

        loaded = convert_hf(path)
    param_dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}")
    # Converted in memory: hand each array over and drop it, so the weights are held once.
    consume = isinstance(loaded.params, dict)
    model = encoder_from_params(
        loaded.config, loaded.params, param_dtype=param_dtype, dtype=param_dtype, consume=consume
    )
    projector = None
    if loaded.projector_config is not None:
        projector = projector_from_params(
            loaded.projector_config, loaded.projector_params, param_dtype=param_dtype, dtype=param_dtype
        )
    return GraniteEncoder(
        model,
        projector=projector,
        buckets=buckets,
        chunk_blocks=chunk_blocks,
        provenance=loaded.provenance,
        devices=devices,
    )

"""What `granite_jax.load` returns: the modules behind jit boundaries, with length buckets and devices.

`Runner.encode` composes named steps: validate the waveforms, pad them to a length bucket and split them
over the devices, run log-mel -> encoder -> projector compiled (one call, or layerwise: see layerwise.py),
and cut the result back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.models.conformer import GraniteSpeechEncoder
from granite_jax.models.conformer_config import EncoderConfig
from granite_jax.models.projector import GraniteSpeechProjector, num_audio_embeddings
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.models.speech5 import GraniteSpeech5Encoder
from granite_jax.models.speech5_config import Speech5Config
from granite_jax.runtime import inputs
from granite_jax.runtime.buckets import BucketPolicy
from granite_jax.runtime.compiled import Bound, Compiled
from granite_jax.runtime.devices import DeviceSpec, RowMesh
from granite_jax.runtime.families import Granite5, family_of
from granite_jax.runtime.generate import GenerateResult, Generator, Language
from granite_jax.runtime.layerwise import BlockWeights
from granite_jax.runtime.results import EncodeResult, WaveformBatch, check_finite
from granite_jax.text.ctc import Transcript, ctc_greedy_ids
from granite_jax.text.tokenizer import CTCTokenizer

BATCH_MODES = ("per_utterance", "hf")


def _batch_mode(batch_mode: str) -> bool:
    """True for HF batch mode."""
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
    return batch_mode == "hf"


class Runner:
    """A Granite Speech checkpoint ready to run under `jax.jit`: encoder, projector and language model when the
    checkpoint has them.

    - `encode(waveforms)`: audio -> log-mel -> encoder -> projector; `extract_features`, `encode_features`,
      `audio_embeddings`, `ctc_logits`, `ctc_greedy`: each step alone.
    - `generate(waveforms, prompt)` and `transcribe(...)`: text (the 4.x language model, or greedy CTC).
    `model` (and `projector`, `language_model`) are the NNX modules, for probing or fine-tuning.

    `devices`: None (all of `jax.local_devices()`), a count, or a list. The parameters are replicated on them
    once, here; batches are split by rows, and every result equals one device's (docs/design.md, Devices).
    `layerwise` (what `load` passes): each block's weights are arrays of their own and the blocks run one
    compiled call each (layerwise.py); reading `model` stacks them back into the module.
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
        language: Language | None = None,
        files: dict[str, str] | None = None,
    ):
        check_chunk_blocks(chunk_blocks)
        self.rows = RowMesh(devices)
        self.devices, self.mesh = self.rows.devices, self.rows.mesh
        self._module = model
        self.config: EncoderConfig | Speech5Config = model.config
        self.projector = projector
        self.projector_config: ProjectorConfig | None = projector.config if projector is not None else None
        self.family = family_of(model, projector, feature_config, tokenizer)
        self.feature_config = self.family.feature_config
        self.tokenizer = tokenizer
        self.buckets = BucketPolicy.make(buckets)
        self.chunk_blocks = chunk_blocks
        self.provenance = dict(provenance or {})
        self.carried_files = dict(files or {})  # the checkpoint's tokenizer, chat template, ... (name -> path)
        self._compute_dtype = jnp.dtype(model.input_linear.kernel.get_value().dtype)
        self._encoder = Bound(model)
        self._projector = Bound(projector) if projector is not None else None
        for bound in (self._encoder, self._projector):
            if bound is not None:
                bound.place(self.rows.replicated)  # once; zero-copy when already on the one device
        self._blocks = BlockWeights.for_runner(model, layerwise, self.rows.replicated)
        self._run = Compiled(
            self.family, self._encoder, self._projector, self._blocks, self.rows, chunk_blocks, self._compute_dtype
        )
        if language is not None and projector is None:
            raise ValueError("a language model needs the projector that feeds it (a whole 4.x checkpoint)")
        self.language_model = language.model if language is not None else None
        self.language_config = language.config if language is not None else None
        self._generator = Generator.from_language(language, self.rows) if language is not None else None

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

    @property
    def num_traces(self) -> int:
        """How many input shapes the compiled functions have been traced (and compiled, or fetched from the
        persistent compilation cache) for so far."""
        return self._run.traces + (self._generator.traces if self._generator is not None else 0)

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
        lens = inputs.lengths(lengths, b, t, minimum=self.family.min_frames)
        x = jnp.pad(jnp.asarray(x, self._compute_dtype), ((0, 0), (0, self.bucket_frames(t) - t), (0, 0)))
        x, lens = self.rows.split_rows(x), self.rows.split_rows(lens, fill=self.family.min_frames)
        if self._blocks is not None:
            _, finite_in, out, _, states, finite_out = self._run.layerwise(
                x, lens, lens, hidden_states=output_hidden_states
            )
        else:
            out, states, finite_in, finite_out = self._run.forward(
                self._encoder.values(), x, lens, hidden_states=output_hidden_states
            )
        check_finite(finite_in[:b], finite_out[:b], "features", "encoder output")
        to = int(self.output_lengths(t))
        out = out[0, :to] if squeeze else out[:b, :to]
        if not output_hidden_states:
            return out
        return out, self.family.cut_states(states, b, t, squeeze)

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
        emb, finite_in, finite_out = self._run.project(
            self._projector.values(), self.rows.split_rows(h), self.rows.split_rows(lens, fill=1)
        )
        check_finite(finite_in[:b], finite_out[:b], "hidden_states", "projector output")
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
        out, finite_in, finite_out = self._run.ctc(self._encoder.values(), h, np.full(b, t, np.int32))
        check_finite(finite_in, finite_out, "hidden_states", "CTC logits")
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
        return self.ctc_decode(self.ctc_frame_ids(hidden_states), lengths, id_to_text=id_to_text)

    def ctc_frame_ids(self, hidden_states: Float[Array, "b t w"] | np.ndarray) -> np.ndarray:
        """The CTC head's per-frame argmax (B, T), computed in tiles (never the whole input's logits)."""
        h, _ = inputs.feature_batch(hidden_states, self.config.output_width, "hidden_states", "output_width")
        b, t = h.shape[:2]
        h = jnp.pad(jnp.asarray(h, self._compute_dtype), ((0, 0), (0, self.bucket_frames(t) - t), (0, 0)))
        ids, finite_in, finite_out = self._run.ctc_ids(self._encoder.values(), h, np.full(b, t, np.int32))
        check_finite(finite_in, finite_out, "hidden_states", "CTC logits")
        return np.asarray(ids)[:, :t]

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
    def _waveforms(self, waveforms: Any, sampling_rate: float, hf: bool) -> WaveformBatch:
        return inputs.waveform_batch(waveforms, sampling_rate, self.family, self.bucket_frames, hf)

    def extract_features(
        self, waveforms: Any, sampling_rate: float = 16000, *, batch_mode: str = "per_utterance"
    ) -> tuple[jax.Array, np.ndarray]:
        """The checkpoint's front end: waveforms -> (features (B, T, input_dim), lengths (B,) int32 frames).

        Like `granite_jax.extract_features`, with this checkpoint's feature settings and buckets.
        """
        hf = _batch_mode(batch_mode)
        batch = self._waveforms(waveforms, sampling_rate, hf)
        samples, sample_lengths, _ = inputs.split_waveforms(batch, self.family, self.rows, hf)
        features = self._run.features(samples, sample_lengths, hf_batch=hf)
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
        batch = self._waveforms(waveforms, sampling_rate, hf)
        split = inputs.split_waveforms(batch, self.family, self.rows, hf)
        with_projector = embeddings and self.projector is not None
        flags = dict(hf_batch=hf, with_projector=with_projector, hidden_states=output_hidden_states)
        if self._blocks is not None:
            features, _, hidden, emb, states, finite = self._run.layerwise(*split, waveforms=True, **flags)
        else:
            proj_values = self._projector.values() if with_projector else None
            features, hidden, emb, states, finite = self._run.encode(
                self._encoder.values(), proj_values, *split, **flags
            )
        b, t = len(batch.frames), int(batch.frames.max())
        check_finite(np.ones(b, bool), finite[:b], "waveforms", "encoder or projector output")
        pcfg = self.projector_config
        out_lengths = self.output_lengths(batch.frames)
        return EncodeResult(
            features[:b, :t],
            hidden[:b, : int(self.output_lengths(t))],
            out_lengths,
            emb[:b, : num_audio_embeddings(t, pcfg)] if with_projector else None,
            num_audio_embeddings(batch.frames, pcfg) if with_projector else None,
            self.family.cut_states(states, b, t) if output_hidden_states else None,
            batch.frames,
        )

    def generate(
        self,
        waveforms: Any,
        prompt: Any = None,
        *,
        sampling_rate: float = 16000,
        max_new_tokens: int = 200,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        speculative: bool = False,
    ) -> GenerateResult:
        """Speech to text with the 4.x language model: audio -> embeddings -> the chat prompt -> generation.

        `prompt`: a string (the user turn after the audio token; default "can you transcribe the speech into a
        written format?"), a list of chat messages taken verbatim (one `<|audio|>` in them), or a list of those,
        one per utterance. `num_beams` > 1: beam search as transformers' (`length_penalty`, `early_stopping`).
        `speculative=True`: greedy, verified against a draft from the encoder's CTC head (the same tokens,
        fewer steps when the draft is right). Each utterance gives what it gives alone. See `GenerateResult`.
        """
        if self._generator is None:
            raise ValueError(
                "this checkpoint has no language model: convert the whole 4.x checkpoint (granite-jax-convert "
                "without --encoder-only) to generate text"
            )
        return self._generator.run(
            self,
            waveforms,
            prompt,
            sampling_rate=sampling_rate,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            speculative=speculative,
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
        items, sampling_rate, single = inputs.audio_or_paths(
            waveforms_or_paths, sampling_rate, self.feature_config.sampling_rate
        )
        if self._generator is not None and not timestamps:
            texts = self.generate(items, sampling_rate=sampling_rate).texts
            return texts[0] if single else texts
        res = self.encode(items, sampling_rate, batch_mode=batch_mode, embeddings=False)
        if not timestamps:
            texts = self.ctc_greedy(res.hidden_states, res.lengths)
            return texts[0] if single else texts
        ids = self.ctc_frame_ids(res.hidden_states)
        out = [self.family.align(ids[i, :n]) for i, n in enumerate(res.lengths)]
        return out[0] if single else out

    @property
    def frame_seconds(self) -> float:
        """Seconds of audio per output frame."""
        return self.family.frame_seconds

    def _num_encoder_values(self) -> int:
        return self._encoder.num_values() + (self._blocks.num_values() if self._blocks is not None else 0)

    def __repr__(self) -> str:
        proj = ""
        if self._projector is not None:
            p, m = self.projector_config, self._projector.num_values()
            proj = f", projector {p.num_hidden_layers} x {p.hidden_size} -> {p.llm_hidden_size} ({m / 1e6:.1f}M)"
        return (
            f"Runner({self.family.describe()}, {self._num_encoder_values() / 1e6:.1f}M values{proj}, "
            f"{self._compute_dtype}, buckets={self.buckets.mode!r}, {len(self.devices)} device(s))"
        )


GraniteEncoder = Runner  # the earlier name


def check_chunk_blocks(chunk_blocks: Any) -> None:
    if chunk_blocks is None:
        return
    if isinstance(chunk_blocks, bool) or not isinstance(chunk_blocks, int) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive integer or None, got {chunk_blocks!r}")

"""What differs between the model families behind one Runner: the front end, the frames, the CTC head, the text.

- `Granite4`: the 4.x encoders (`GraniteSpeechEncoder`): log-mel pairs, one output frame per input frame,
  the CTC head `out` on the final layer, ids read as characters.
- `Granite5`: Granite Speech 5 / TurboCTC (`GraniteSpeech5Encoder`): log-mel + deltas, frames halved per
  subsampling block, the (tied) `ctc_head`, ids decoded by the BPE tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from granite_jax.frontend.config import FeatureConfig, Speech5FeatureConfig
from granite_jax.frontend.features import log_mel, min_samples, num_encoder_frames, speech5_features, speech5_frames
from granite_jax.models import speech5
from granite_jax.models.conformer import EncoderOutput, masked
from granite_jax.runtime import tiling
from granite_jax.runtime.tiling5 import tiled_block_step
from granite_jax.text.ctc import Transcript, align
from granite_jax.text.tokenizer import CTCTokenizer


class Granite4:
    """The 4.x encoders."""

    name = "granite_speech"
    masks_padding = False  # transformers' encoder has no padding mask

    def __init__(self, feature_config: FeatureConfig, config):
        self.feature_config = feature_config
        self.config = config
        self.tokenizer = None

    def frames(self, num_samples):
        """Encoder input frames of `num_samples` samples (int or array)."""
        return num_encoder_frames(num_samples, self.feature_config)

    def samples_for_frames(self, frames: int) -> int:
        """The most samples that give `frames` frames."""
        return (2 * frames + 1) * self.feature_config.hop_length - 1

    def min_samples(self) -> int:
        return min_samples(self.feature_config)

    def features(self, waveforms: jax.Array, lengths: jax.Array, hf_batch: bool) -> jax.Array:
        return log_mel(waveforms, lengths, self.feature_config, hf_batch=hf_batch)

    def encode(self, model, features, valid, chunk_blocks, hidden_states: bool = False) -> EncoderOutput:
        out = tiling.forward(model, features, valid, chunk_blocks, hidden_states=hidden_states)
        return out._replace(valid=valid)

    # -- one block per call (layerwise.py): carry = the blocks' (x, kept outputs, None); aux = what they read
    def block_kinds(self) -> list[tuple[int, bool]]:
        """(its stack, whether its output is shorter than its input) per block."""
        return [(0, False)] * self.config.num_layers

    def begin(self, model, features, valid, chunk_blocks, hidden_states: bool = False):
        """(carry, aux): the input projection, the batch padded to whole tiles."""
        strategy, padded, padded_valid = tiling.pad_to_tiles(model, features, valid, chunk_blocks)
        carry, embedded = model.begin(padded, padded_valid, strategy, model.kept_layers(hidden_states))
        if not (hidden_states or 0 in self.config.exported_layers):
            embedded = None  # unread: not kept beside the carry that the blocks overwrite
        return carry, (embedded, padded_valid, valid)

    def carry_spec(self, spec):
        return (spec, jax.sharding.PartitionSpec(None, *spec), spec)  # (x, kept (layers, batch, ...), None)

    def step(self, model, block, carry, aux, i, kind, chunk_blocks, hidden_states: bool = False):
        """Block i on the carry: (carry, None)."""
        _, slots, _ = model.layer_inputs(model.kept_layers(hidden_states))
        strategy = tiling.strategy(model, chunk_blocks)
        carry = model.block_step(block, carry, (i, jnp.asarray(slots)[i], None), valid=aux[1], strategy=strategy)
        return carry, None

    def end(self, model, carry, aux, states, hidden_states: bool = False) -> EncoderOutput:
        embedded, padded_valid, valid = aux
        out = model.finish(embedded, carry, padded_valid, model.kept_layers(hidden_states), hidden_states)
        return tiling.cut_back(out, *valid.shape)._replace(valid=valid)

    def output_lengths(self, frames):
        return frames

    def ctc_logits(self, model, hidden: jax.Array) -> jax.Array:
        return model.out(hidden[..., -self.config.hidden_dim :])  # plus: the last layer comes last

    blank = 0
    min_frames = 1  # the fewest input frames a row may have

    def tile_frames(self, chunk_blocks: int | None) -> int | None:
        """Frames per tile: `chunk_blocks` attention blocks (None: untiled)."""
        return None if chunk_blocks is None else chunk_blocks * self.config.context_size

    def text(self, tokens: Sequence[int]) -> str:
        """Emitted CTC tokens (collapsed once, `ctc.collapse`) -> text: the character heads' `chr(id)`."""
        return "".join(chr(int(i)) for i in tokens)

    def align(self, ids: Sequence[int]) -> Transcript:
        """Greedy text with character and word times (words start at spaces), from per-frame best ids."""
        return align(ids, self.frame_seconds, self.text, chr, lambda _, t: t == " ")

    @property
    def frame_seconds(self) -> float:
        """Seconds per output frame."""
        return 2 * self.feature_config.hop_length / self.feature_config.sampling_rate

    def states_spec(self, spec):
        return jax.sharding.PartitionSpec(None, *spec)  # (layers + 1, batch, ...)

    def cut_states(self, states, b: int, t: int, squeeze: bool = False):
        """Per-layer states (layers + 1, B', T', d) cut back from the bucket and the padded batch."""
        return states[:, 0, :t] if squeeze else states[:, :b, :t]

    def describe(self) -> str:
        c = self.config
        return f"{c.num_layers} layers x {c.hidden_dim}, {c.num_heads} heads x {c.dim_head}, context {c.context_size}"


class Granite5:
    """Granite Speech 5 (TurboCTC)."""

    name = "granite_speech5"
    masks_padding = True  # transformers' encoder takes the extractor's attention_mask

    def __init__(self, feature_config: Speech5FeatureConfig, config, tokenizer: CTCTokenizer | None):
        self.feature_config = feature_config
        self.config = config
        self.tokenizer = tokenizer

    def frames(self, num_samples):
        return speech5_frames(num_samples, self.feature_config)

    def samples_for_frames(self, frames: int) -> int:
        return 2 * frames * self.feature_config.hop_length + self.feature_config.hop_length - 1

    def min_samples(self) -> int:
        """Enough for torch's reflect padding, and for every subsampling block to see two frames."""
        cfg = self.feature_config
        return max(cfg.n_fft // 2 + 1, (2 * self.config.subsampling - 1) * cfg.hop_length)

    def features(self, waveforms: jax.Array, lengths: jax.Array, hf_batch: bool) -> jax.Array:
        return speech5_features(waveforms, lengths, self.feature_config, hf_batch=hf_batch)

    def encode(self, model, features, valid, chunk_blocks, hidden_states: bool = False) -> EncoderOutput:
        return model.forward(features, valid, hidden_states=hidden_states)

    # -- one block per call (layerwise.py): carry = (x, its mask); aux = the input projection
    def block_kinds(self) -> list[tuple[int, bool]]:
        """(its stack, whether its output is shorter than its input) per block."""
        out = []
        for s, (start, end, subsampling) in enumerate(speech5.segments(self.config)):
            out += [(s, subsampling)] * (end - start)
        return out

    def begin(self, model, features, valid, chunk_blocks, hidden_states: bool = False):
        x = masked(model.input_linear(features), valid)
        return (x, valid), (x if hidden_states else None)

    def carry_spec(self, spec):
        return spec

    def step(self, model, block, carry, aux, i, kind, chunk_blocks, hidden_states: bool = False):
        """Block i: (carry, its own output as HF's hidden_states keep it, or None)."""
        span = self.tile_frames(chunk_blocks)
        if span is not None and not hidden_states and carry[0].shape[1] > span:  # long: in tiles, as the same
            return tiled_block_step(model, block, *carry, i, kind[1], span), None
        x, valid, own, _ = model.block_step(block, *carry, i, kind[1])
        return (x, valid), own if hidden_states else None

    def end(self, model, carry, aux, states, hidden_states: bool = False) -> EncoderOutput:
        x, valid = carry
        return EncoderOutput(x, (aux, *states) if hidden_states else None, None, valid)

    def output_lengths(self, frames):
        return self.config.output_frames(frames)

    def ctc_logits(self, model, hidden: jax.Array) -> jax.Array:
        return model.ctc_logits(hidden)

    @property
    def blank(self) -> int:
        return self.config.pad_token_id

    @property
    def min_frames(self) -> int:
        """The fewest input frames a row may have: every subsampling block needs two."""
        return self.config.subsampling

    def tile_frames(self, chunk_blocks: int | None) -> int | None:
        """Frames per tile at every resolution: `chunk_blocks` attention blocks, rounded up to an even count
        (a subsampling block pools pairs). None: untiled."""
        if chunk_blocks is None:
            return None
        span = chunk_blocks * self.config.context_size
        return span + span % 2 * span

    def text(self, tokens: Sequence[int]) -> str:
        """Emitted CTC tokens (collapsed once, `ctc.collapse`) -> text, by the BPE tokenizer."""
        return self._tokenizer().decode_tokens(tokens)

    def align(self, ids: Sequence[int]) -> Transcript:
        """Greedy text with token and word times (words start at the tokenizer's word markers, Ġ or ▁), from
        per-frame best ids; special tokens, which the text skips, get no span."""
        tok = self._tokenizer()
        return align(
            ids,
            self.frame_seconds,
            tok.decode_tokens,
            tok.token,
            lambda k, _: tok.starts_word(k),
            tok.blank_id,
            shown=lambda k: not tok.is_special(k),
        )

    def _tokenizer(self) -> CTCTokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer (tokenizer.json): text needs one")
        return self.tokenizer

    @property
    def frame_seconds(self) -> float:
        fc = self.feature_config
        return 2 * fc.hop_length * self.config.subsampling / fc.sampling_rate

    def states_spec(self, spec):
        return tuple([spec] * (self.config.num_hidden_layers + 1))  # a tuple of (batch, frames_i, d)

    def cut_states(self, states, b: int, t: int, squeeze: bool = False):
        """Per-layer states cut back from the bucket and the padded batch: the input projection at T, then
        each block at its own resolution."""
        lengths, n = [t], t
        for i in range(self.config.num_hidden_layers):
            n = n // 2 if i in self.config.subsample_layers else n
            lengths.append(n)
        return tuple(s[0, :m] if squeeze else s[:b, :m] for s, m in zip(states, lengths, strict=True))

    def describe(self) -> str:
        c = self.config
        return (
            f"Granite Speech 5: {c.num_hidden_layers} layers x {c.hidden_size}, {c.num_attention_heads} heads x "
            f"{c.head_dim}, context {c.context_size}, subsampling x{c.subsampling}, vocabulary {c.vocab_size}"
        )


def family_of(model, projector, feature_config, tokenizer: CTCTokenizer | None) -> Granite4 | Granite5:
    """The family of an encoder module, with its front end's settings (the defaults when None)."""
    from granite_jax.models.speech5 import GraniteSpeech5Encoder

    if isinstance(model, GraniteSpeech5Encoder):
        if projector is not None:
            raise ValueError("Granite Speech 5 has no projector")
        if tokenizer is not None:
            tokenizer.check_vocab(model.config.vocab_size, model.config.pad_token_id)
        fc = feature_config or Speech5FeatureConfig(num_mel_bins=model.config.num_mel_bins)
        return Granite5(fc, model.config, tokenizer)
    return Granite4(feature_config or FeatureConfig(), model.config)


def greedy_ids(logits: jax.Array) -> np.ndarray:
    return np.asarray(jnp.argmax(logits, axis=-1))

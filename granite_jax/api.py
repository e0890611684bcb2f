"""What `granite_jax.load` returns: a converted encoder behind one jit boundary, with length buckets."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from granite_jax import checkpoint
from granite_jax.config import EncoderConfig
from granite_jax.modeling import GraniteSpeechEncoder, encoder_from_params


def _geometric_blocks(n: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^(k-1)) that is >= n."""
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    if n == p:
        return p
    return p * 3 // 2 if p >= 2 and n <= p * 3 // 2 else 2 * p


@dataclass(frozen=True)
class BucketPolicy:
    """Which padded length T is compiled for an input of `t` frames.

    - "auto" (default): a whole number of blocks from 1, 2, 3, 4, 6, 8, 12, 16, ... blocks of
      context_size frames. At most 50% padding (mostly under 33%), and a stream of lengths up to
      N blocks compiles at most about 2 log2(N) times.
    - "block": the next multiple of context_size (least padding; one compile per block count).
    - a sequence of frame counts (multiples of context_size): the smallest that fits; longer inputs
      fall back to "auto".
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
        bad = [f for f in frames if f <= 0 or f % context_size]
        if not frames or bad:
            raise ValueError(
                f"bucket sizes must be positive multiples of context_size={context_size}, got {bad or frames}"
            )
        return cls(frames)

    def frames_for(self, t: int, context_size: int) -> int:
        if isinstance(self.mode, tuple):
            for f in self.mode:
                if f >= t:
                    return f
        blocks = math.ceil(t / context_size)
        if self.mode == "block":
            return blocks * context_size
        return _geometric_blocks(blocks) * context_size


class GraniteEncoder:
    """A Granite Speech encoder ready to run: `encode_features(features, lengths)` under one `jax.jit`.

    `model` is the NNX module (for probing or fine-tuning); `config` its `EncoderConfig`.
    """

    def __init__(
        self,
        model: GraniteSpeechEncoder,
        *,
        buckets: str | Sequence[int] | BucketPolicy = "auto",
        provenance: dict | None = None,
    ):
        self.model = model
        self.config: EncoderConfig = model.config
        self.buckets = BucketPolicy.make(buckets, self.config.context_size)
        self.provenance = dict(provenance or {})
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        # The module's Variable objects, kept once: reading their values per call costs microseconds
        # (nnx.state walks the whole graph: ~20 ms at production size) and still sees every update to
        # them (fine-tuning). Replacing submodules needs a new GraniteEncoder.
        self._variables = nnx.to_flat_state(state)
        self._traces = 0
        self._forward = jax.jit(self._forward_impl)

    def _current_values(self) -> list[jax.Array]:
        return [v.get_value() for _, v in self._variables]

    def _forward_impl(self, values, features, lengths):
        self._traces += 1  # runs once per trace, i.e. per compiled shape
        state = nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(self._variables, values, strict=True)])
        model = nnx.merge(self._graphdef, state)
        valid = jnp.arange(features.shape[1])[None, :] < lengths[:, None]
        return model(features, valid)

    @property
    def num_compilations(self) -> int:
        """How many input shapes `encode_features` has compiled for so far."""
        return self._traces

    def bucket_frames(self, num_frames: int) -> int:
        """The padded length that an input of `num_frames` frames runs at."""
        return self.buckets.frames_for(num_frames, self.config.context_size)

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
        if lengths is None:
            lens = np.full((b,), t, np.int32)
        else:
            lens = np.asarray(lengths)
            if lens.shape != (b,) or not np.issubdtype(lens.dtype, np.integer):
                raise ValueError(f"lengths must be {b} integers (one per row), got {lengths!r}")
            if lens.min() < 1 or lens.max() > t:
                raise ValueError(f"lengths must lie in [1, {t}] (the number of frames), got {lens.tolist()}")
            lens = lens.astype(np.int32)
        tb = self.bucket_frames(t)
        dtype = self._compute_dtype
        x = jnp.pad(jnp.asarray(x, dtype), ((0, 0), (0, tb - t), (0, 0)))
        out = self._forward(self._current_values(), x, jnp.asarray(lens))[:, :t]
        return out[0] if squeeze else out

    @property
    def _compute_dtype(self):
        return self.model.input_linear.kernel[...].dtype

    def __repr__(self) -> str:
        c = self.config
        n = sum(int(np.prod(x.shape)) for x in self._current_values())
        return (
            f"GraniteEncoder({c.num_layers} layers x {c.hidden_dim}, {c.num_heads} heads x {c.dim_head}, "
            f"context {c.context_size}, {n / 1e6:.1f}M values, {self._compute_dtype}, buckets={self.buckets.mode!r})"
        )


def load(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    buckets: str | Sequence[int] | BucketPolicy = "auto",
) -> GraniteEncoder:
    """Load an encoder from a granite-jax-convert directory, or convert an HF checkpoint in memory.

    `path`: a granite_jax checkpoint, an HF checkpoint directory, or a hub id (downloaded if online).
    `dtype`: parameter and compute dtype ("float32" default); stored parameters are cast to it.
    `buckets`: padded-length policy, see `BucketPolicy`.
    """
    path = os.fspath(path)
    if checkpoint.is_checkpoint(path):
        config, params, provenance = checkpoint.load(path)
    else:
        from granite_jax.convert.convert import convert_hf

        config, params, provenance = convert_hf(path)
    param_dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}")
    # Converted in memory: hand each array over and drop it, so the weights are held once.
    consume = isinstance(params, dict)
    model = encoder_from_params(config, params, param_dtype=param_dtype, dtype=param_dtype, consume=consume)
    return GraniteEncoder(model, buckets=buckets, provenance=provenance)

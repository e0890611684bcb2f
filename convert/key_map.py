"""The HF key tables: HF key pattern -> (NNX path, transform), used in both directions.

Two tables: the encoder's (`ENCODER_KEYS`, keys relative to `encoder.`) and the projector's
(`PROJECTOR_KEYS`, keys relative to `projector.`: a BLIP-2 Q-Former, a learned query, a linear map).
Patterns name their variable parts (`layers.{i}.{ff}.up_proj.weight`); each row compiles to a regex
each way, so the same table converts HF -> NNX and back (round trips).

Every source key must match exactly one row and every NNX parameter must be filled exactly once;
anything else raises `ConversionError` naming the keys (bonsai only warns; we refuse).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np


class ConversionError(ValueError):
    """A checkpoint that does not match the encoder (or projector) config: names every offending key."""


@dataclass(frozen=True)
class Transform:
    """A layout change from a torch tensor to the NNX one, and back."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# nn.Linear weight (out, in) -> nnx.Linear kernel (in, out)
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T)
# nn.Conv1d(kernel_size=1) weight (out, in, 1) -> nnx.Linear kernel (in, out)
POINTWISE_CONV = Transform("pointwise_conv", lambda a: a[:, :, 0].T, lambda a: a.T[:, :, None])
# depthwise nn.Conv1d weight (channels, 1, k) -> (k, channels)
DEPTHWISE_CONV = Transform("depthwise_conv", lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :])
# BatchNorm's num_batches_tracked: int64 in torch, int32 in JAX (x64 off)
COUNTER = Transform("counter", lambda a: a, lambda a: a.astype(np.int64))

# Named placeholders shared by both sides of a row; `{i}` is a layer index.
_GROUPS = {
    "i": r"\d+",
    "lin": r"input_linear|out|out_mid",
    "ln": r"ff1\.pre_norm|ff2\.pre_norm|attn\.pre_norm|conv\.norm|post_norm",
    "ff": r"ff1|ff2",
    "proj": r"up_proj|down_proj",
    "qkv": r"to_q|to_kv|to_out",
    "pw": r"up_conv|down_conv",
}
# (HF key relative to the encoder, NNX path, transform)
KEY_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("{lin}.weight", "{lin}.kernel", LINEAR),
    ("{lin}.bias", "{lin}.bias", IDENTITY),
    ("layers.{i}.{ln}.weight", "layers.{i}.{ln}.scale", IDENTITY),
    ("layers.{i}.{ln}.bias", "layers.{i}.{ln}.bias", IDENTITY),
    ("layers.{i}.{ff}.{proj}.weight", "layers.{i}.{ff}.{proj}.kernel", LINEAR),
    ("layers.{i}.{ff}.{proj}.bias", "layers.{i}.{ff}.{proj}.bias", IDENTITY),
    ("layers.{i}.attn.{qkv}.weight", "layers.{i}.attn.{qkv}.kernel", LINEAR),
    ("layers.{i}.attn.to_out.bias", "layers.{i}.attn.to_out.bias", IDENTITY),
    ("layers.{i}.attn.rel_pos_emb.weight", "layers.{i}.attn.rel_pos_emb.embedding", IDENTITY),
    ("layers.{i}.conv.{pw}.weight", "layers.{i}.conv.{pw}.kernel", POINTWISE_CONV),
    ("layers.{i}.conv.{pw}.bias", "layers.{i}.conv.{pw}.bias", IDENTITY),
    ("layers.{i}.conv.depth_conv.conv.weight", "layers.{i}.conv.depth_conv.kernel", DEPTHWISE_CONV),
    ("layers.{i}.conv.batch_norm.weight", "layers.{i}.conv.batch_norm.scale", IDENTITY),
    ("layers.{i}.conv.batch_norm.bias", "layers.{i}.conv.batch_norm.bias", IDENTITY),
    ("layers.{i}.conv.batch_norm.running_mean", "layers.{i}.conv.batch_norm.mean", IDENTITY),
    ("layers.{i}.conv.batch_norm.running_var", "layers.{i}.conv.batch_norm.var", IDENTITY),
    (
        "layers.{i}.conv.batch_norm.num_batches_tracked",
        "layers.{i}.conv.batch_norm.num_batches_tracked",
        COUNTER,
    ),
)


# The projector (GraniteSpeechEncoderProjector): `query`, a BLIP-2 Q-Former, `linear`. Every Linear is
# weight -> kernel (transposed) and every LayerNorm weight -> scale; nothing else is renamed.
_PROJECTOR_GROUPS = {
    "i": r"\d+",
    "att": r"attention|crossattention",  # self-attention / cross-attention blocks of a Q-Former layer
    "qkv": r"query|key|value",
    "ffn": r"intermediate|intermediate_query",  # the dense before hidden_act
    "out": r"output|output_query",  # dense + LayerNorm after it
}
_LAYER = "qformer.encoder.layer.{i}"
PROJECTOR_KEY_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("query", "query", IDENTITY),  # (1, num_queries, hidden_size), the learned queries
    ("linear.weight", "linear.kernel", LINEAR),
    ("linear.bias", "linear.bias", IDENTITY),
    ("qformer.layernorm.weight", "qformer.layernorm.scale", IDENTITY),
    ("qformer.layernorm.bias", "qformer.layernorm.bias", IDENTITY),
    (_LAYER + ".{att}.attention.{qkv}.weight", _LAYER + ".{att}.attention.{qkv}.kernel", LINEAR),
    (_LAYER + ".{att}.attention.{qkv}.bias", _LAYER + ".{att}.attention.{qkv}.bias", IDENTITY),
    (_LAYER + ".{att}.output.dense.weight", _LAYER + ".{att}.output.dense.kernel", LINEAR),
    (_LAYER + ".{att}.output.dense.bias", _LAYER + ".{att}.output.dense.bias", IDENTITY),
    (_LAYER + ".{att}.output.LayerNorm.weight", _LAYER + ".{att}.output.LayerNorm.scale", IDENTITY),
    (_LAYER + ".{att}.output.LayerNorm.bias", _LAYER + ".{att}.output.LayerNorm.bias", IDENTITY),
    (_LAYER + ".{ffn}.dense.weight", _LAYER + ".{ffn}.dense.kernel", LINEAR),
    (_LAYER + ".{ffn}.dense.bias", _LAYER + ".{ffn}.dense.bias", IDENTITY),
    (_LAYER + ".{out}.dense.weight", _LAYER + ".{out}.dense.kernel", LINEAR),
    (_LAYER + ".{out}.dense.bias", _LAYER + ".{out}.dense.bias", IDENTITY),
    (_LAYER + ".{out}.LayerNorm.weight", _LAYER + ".{out}.LayerNorm.scale", IDENTITY),
    (_LAYER + ".{out}.LayerNorm.bias", _LAYER + ".{out}.LayerNorm.bias", IDENTITY),
)


# Granite Speech 5 (`GraniteSpeech5ForCTC`): keys relative to `encoder.`, and `ctc_head.*` beside it when the
# head is not tied to `out`. Every Linear is weight -> kernel (transposed); the depthwise conv's weight is the
# module's `depthwise_conv` kernel itself.
_SPEECH5_GROUPS = {
    "i": r"\d+",
    "lin": r"input_linear|out|out_mid|ctc_head",
    "ff": r"feed_forward1|feed_forward2",
    "fl": r"linear1|linear2",
    "proj": r"q_proj|k_proj|v_proj|o_proj",
    "pw": r"pointwise_lin1|pointwise_lin2",
    "ln": r"norm_feed_forward1|norm_self_att|norm_conv|norm_feed_forward2|norm_out",
}
SPEECH5_KEY_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("{lin}.weight", "{lin}.kernel", LINEAR),
    ("{lin}.bias", "{lin}.bias", IDENTITY),
    ("layers.{i}.{ff}.{fl}.weight", "layers.{i}.{ff}.{fl}.kernel", LINEAR),
    ("layers.{i}.{ff}.{fl}.bias", "layers.{i}.{ff}.{fl}.bias", IDENTITY),
    ("layers.{i}.self_attn.{proj}.weight", "layers.{i}.self_attn.{proj}.kernel", LINEAR),
    ("layers.{i}.self_attn.o_proj.bias", "layers.{i}.self_attn.o_proj.bias", IDENTITY),
    ("layers.{i}.self_attn.rel_pos_emb.weight", "layers.{i}.self_attn.rel_pos_emb.embedding", IDENTITY),
    ("layers.{i}.conv.{pw}.weight", "layers.{i}.conv.{pw}.kernel", LINEAR),
    ("layers.{i}.conv.{pw}.bias", "layers.{i}.conv.{pw}.bias", IDENTITY),
    ("layers.{i}.conv.depthwise_conv.weight", "layers.{i}.conv.depthwise_conv", DEPTHWISE_CONV),
    ("layers.{i}.conv.norm.weight", "layers.{i}.conv.norm.scale", IDENTITY),
    ("layers.{i}.conv.norm.bias", "layers.{i}.conv.norm.bias", IDENTITY),
    ("layers.{i}.conv.norm.running_mean", "layers.{i}.conv.norm.mean", IDENTITY),
    ("layers.{i}.conv.norm.running_var", "layers.{i}.conv.norm.var", IDENTITY),
    ("layers.{i}.conv.norm.num_batches_tracked", "layers.{i}.conv.norm.num_batches_tracked", COUNTER),
    ("layers.{i}.{ln}.weight", "layers.{i}.{ln}.scale", IDENTITY),
    ("layers.{i}.{ln}.bias", "layers.{i}.{ln}.bias", IDENTITY),
)


# The language model (`GraniteForCausalLM`): keys relative to the language model, `model.*` and `lm_head.weight`
# (absent when tied). Linear weights -> kernels (transposed), the embedding table as it is, RMSNorm weights
# keep their name.
_LM_GROUPS = {
    "i": r"\d+",
    "attn": r"q_proj|k_proj|v_proj|o_proj",
    "mlp": r"gate_proj|up_proj|down_proj",
    "rms": r"input_layernorm|post_attention_layernorm",
}
LM_KEY_TABLE: tuple[tuple[str, str, Transform], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", IDENTITY),
    ("model.norm.weight", "model.norm.weight", IDENTITY),
    ("lm_head.weight", "lm_head.weight", IDENTITY),
    ("model.layers.{i}.self_attn.{attn}.weight", "model.layers.{i}.self_attn.{attn}.weight", IDENTITY),
    ("model.layers.{i}.self_attn.{attn}.bias", "model.layers.{i}.self_attn.{attn}.bias", IDENTITY),
    ("model.layers.{i}.mlp.{mlp}.weight", "model.layers.{i}.mlp.{mlp}.weight", IDENTITY),
    ("model.layers.{i}.mlp.{mlp}.bias", "model.layers.{i}.mlp.{mlp}.bias", IDENTITY),
    ("model.layers.{i}.{rms}.weight", "model.layers.{i}.{rms}.weight", IDENTITY),
)


def _compile(template: str, groups: Mapping[str, str]) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{groups[p]})" for k, p in enumerate(parts)))


class KeyTable:
    """One table's rows compiled both ways: HF key -> (NNX path, transform) and NNX path -> HF key.

    `name` ("encoder", "projector") is what error messages call the tensors.
    """

    def __init__(self, name: str, rows: tuple[tuple[str, str, Transform], ...], groups: Mapping[str, str]):
        self.name = name
        self.rows = rows
        self._forward = tuple((_compile(s, groups), t, tf) for s, t, tf in rows)
        self._backward = tuple((_compile(t, groups), s, tf) for s, t, tf in rows)

    @staticmethod
    def _lookup(rules, key: str) -> tuple[str, Transform] | None:
        for pattern, template, transform in rules:
            m = pattern.fullmatch(key)
            if m:
                return template.format(**m.groupdict()), transform
        return None

    def map_key(self, source_key: str) -> tuple[str, Transform] | None:
        """The NNX path and transform for one HF key (relative to the module), or None."""
        return self._lookup(self._forward, source_key)

    def hf_key(self, path: str) -> tuple[str, Transform] | None:
        """The HF key (relative to the module) and transform for one NNX path, or None."""
        return self._lookup(self._backward, path)

    def __repr__(self) -> str:
        return f"KeyTable({self.name!r}, {len(self.rows)} rows)"


ENCODER_KEYS = KeyTable("encoder", KEY_TABLE, _GROUPS)
PROJECTOR_KEYS = KeyTable("projector", PROJECTOR_KEY_TABLE, _PROJECTOR_GROUPS)
SPEECH5_KEYS = KeyTable("Granite Speech 5 encoder", SPEECH5_KEY_TABLE, _SPEECH5_GROUPS)
LM_KEYS = KeyTable("language model", LM_KEY_TABLE, _LM_GROUPS)


def map_key(source_key: str) -> tuple[str, Transform] | None:
    """The NNX path and transform for one HF encoder key (relative to the encoder), or None."""
    return ENCODER_KEYS.map_key(source_key)


def _shape_str(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def plan(
    source_keys: Iterable[str], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]], table: KeyTable
) -> dict[str, tuple[str, Transform]]:
    """{NNX path: (HF key, transform)} covering `expected` exactly once; raises `ConversionError` listing
    unmapped, duplicate, unexpected and missing keys."""
    what = table.name
    out: dict[str, tuple[str, Transform]] = {}
    unmapped, unexpected, duplicates = [], [], []
    for key in sorted(source_keys):
        hit = table.map_key(key)
        if hit is None:
            unmapped.append(key)
            continue
        target, transform = hit
        if target not in expected:
            unexpected.append(f"{key} (-> {target})")
        elif target in out:
            duplicates.append(f"{key} and {out[target][0]} both map to {target}")
        else:
            out[target] = (key, transform)
    missing = sorted(set(expected) - set(out))
    problems = []
    if unmapped:
        problems.append(f"{what} tensors with no mapping: " + ", ".join(unmapped))
    if unexpected:
        problems.append(f"{what} tensors this config has no parameter for: " + ", ".join(unexpected))
    if duplicates:
        problems.append("; ".join(duplicates))
    if missing:
        problems.append("parameters not filled by the checkpoint: " + ", ".join(missing))
    if problems:
        raise ConversionError(f"checkpoint does not match the {what} config:\n  " + "\n  ".join(problems))
    return out


def _mismatch(key: str, raw_shape, transform: Transform, target: str, shape) -> str:
    want = transform.inverse(np.empty(shape, np.int8)).shape
    return (
        f"{key}: checkpoint shape {_shape_str(raw_shape)}, config expects {_shape_str(want)} "
        f"(NNX {target} {_shape_str(shape)})"
    )


def _converted(key: str, raw: np.ndarray, transform: Transform, dtype: np.dtype) -> tuple[np.ndarray, bool]:
    """(the tensor in the NNX layout and dtype, whether it is finite)."""
    value = np.require(transform.forward(raw), requirements="C").astype(dtype, copy=False)
    finite = not (value.dtype.kind == "f" or value.dtype.name == "bfloat16") or bool(np.isfinite(value).all())
    return value, finite


class LazyConversion(Mapping):
    """{NNX path: array} over an HF module's tensors, each read, transformed and checked when asked for (the
    language model: converted and written one tensor at a time). Shapes are checked up front where the
    source's header gives them; a non-finite tensor raises `ConversionError` naming it when read."""

    def __init__(self, planned, read, expected, what: str):
        self._plan, self._read, self._expected, self._what = planned, read, expected, what

    def __getitem__(self, target: str) -> np.ndarray:
        key, transform = self._plan[target]
        shape, dtype = self._expected[target]
        raw = self._read(key)
        value, finite = _converted(key, raw, transform, dtype)
        if tuple(value.shape) != tuple(shape):
            problem = _mismatch(key, raw.shape, transform, target, shape)
            raise ConversionError(f"{self._what} shape mismatch: {problem}")
        if not finite:
            raise ConversionError(f"{self._what} tensor {key} holds NaN or infinite values (as stored)")
        return value

    def __iter__(self):
        return iter(self._plan)

    def dtype_of(self, target: str) -> np.dtype:
        return np.dtype(self._expected[target][1])

    def __len__(self) -> int:
        return len(self._plan)


def hf_to_flax(
    source_keys: Iterable[str],
    read: Callable[[str], np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    *,
    table: KeyTable = ENCODER_KEYS,
    on_tensor: Callable[[str], None] | None = None,
    lazy: bool = False,
    shape_of: Callable[[str], tuple[int, ...] | None] | None = None,
) -> Mapping[str, np.ndarray]:
    """Map HF tensors of one module (the encoder, or the projector with `table=PROJECTOR_KEYS`) onto NNX paths.

    `source_keys` are relative to the module; `read(key)` loads one tensor (lazily: only mapped keys
    are read); `expected` is {nnx path: (shape, dtype)} of the model to fill. The result is cast to
    the expected dtypes. Raises `ConversionError` listing unmapped, duplicate, missing and mis-shaped keys.
    `lazy`: a `LazyConversion` instead (nothing read here; `shape_of(key)`, when given, checks the shapes
    up front from the source's header).
    """
    what = table.name
    planned = plan(source_keys, expected, table)
    if lazy:
        mismatched = []
        for target, (key, transform) in planned.items():
            raw_shape = shape_of(key) if shape_of is not None else None
            if raw_shape is not None:
                got = transform.forward(np.empty(raw_shape, np.int8)).shape
                if tuple(got) != tuple(expected[target][0]):
                    mismatched.append(_mismatch(key, raw_shape, transform, target, expected[target][0]))
        if mismatched:
            raise ConversionError(f"{what} shape mismatch:\n  " + "\n  ".join(mismatched))
        return LazyConversion(planned, read, expected, what)
    out: dict[str, np.ndarray] = {}
    mismatched, non_finite = [], []
    for target in sorted(planned):
        key, transform = planned[target]
        raw = read(key)
        shape, dtype = expected[target]
        value, finite = _converted(key, raw, transform, dtype)
        if tuple(value.shape) != tuple(shape):
            mismatched.append(_mismatch(key, raw.shape, transform, target, shape))
            continue
        if not finite:
            # NaN / inf in the source, or values beyond the stored dtype's range
            non_finite.append(f"{key} ({int((~np.isfinite(value)).sum())} of {value.size} values)")
        out[target] = value
        if on_tensor is not None:
            on_tensor(key)
    if mismatched:
        raise ConversionError(f"{what} shape mismatch:\n  " + "\n  ".join(mismatched))
    if non_finite:
        raise ConversionError(f"{what} tensors with NaN or infinite values (as stored): " + ", ".join(non_finite))
    return out


def flax_to_hf(
    params: Mapping[str, np.ndarray], *, prefix: str = "", table: KeyTable = ENCODER_KEYS
) -> dict[str, np.ndarray]:
    """Inverse of `hf_to_flax`: NNX paths back to HF keys in torch layouts (round trips).

    For a whole HF state dict: `flax_to_hf(enc, prefix="encoder.") | flax_to_hf(proj, prefix="projector.",
    table=PROJECTOR_KEYS)`.
    """
    out = {}
    for path, value in params.items():
        hit = table.hf_key(path)
        if hit is None:
            raise ConversionError(f"no HF key for NNX {table.name} parameter {path}")
        key, transform = hit
        out[prefix + key] = np.require(transform.inverse(np.asarray(value)), requirements="C")
    return out

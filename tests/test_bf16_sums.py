"""Every 16-bit product in the models is summed in fp32.

A bf16 `x @ w` that returns bf16 loses precision (HF's CPU kernels sum in fp32, then round once), and XLA CPU
runs it at the fp32 rate, while the fp32-summed form (`preferred_element_type=float32`) takes the fast bf16
kernels. This test traces each model in bf16 and finds every `dot_general` with 16-bit operands, inside scans,
loops, conds and custom derivatives too, and checks its result type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from granite_jax.models import conformer, granite, projector, speech5
from granite_jax.models.granite_config import GraniteConfig
from granite_jax.models.projector_config import ProjectorConfig
from granite_jax.testing import TINY
from granite_jax.testing.hf5 import TINY5
from granite_jax.train.lora import add_lora

BF16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def sub_jaxprs(params: dict):
    """The jaxprs nested in an equation's parameters (scan, while, cond, pjit, custom_vjp...)."""
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def low_precision_dots(jaxpr) -> list[tuple[str, str]]:
    """(operand dtypes, result dtype) of every dot_general whose operands are 16-bit floats."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dtypes = [v.aval.dtype for v in eqn.invars]
            if any(jnp.dtype(d).itemsize == 2 for d in dtypes):
                found.append(("x".join(jnp.dtype(d).name for d in dtypes), jnp.dtype(eqn.outvars[0].aval.dtype).name))
        for sub in sub_jaxprs(eqn.params):
            found += low_precision_dots(sub)
    return found


def traced(module: nnx.Module, fn, *args):
    graphdef, state = nnx.split(module)
    return jax.make_jaxpr(lambda s, *a: fn(nnx.merge(graphdef, s), *a))(state, *args).jaxpr


def encoder_4x():
    model = conformer.GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0), **BF16)
    x = jnp.zeros((2, 21, TINY.input_dim), jnp.bfloat16)
    return traced(model, lambda m, x: m(x, jnp.ones(x.shape[:2], bool)), x)


def encoder_speech5():
    model = speech5.GraniteSpeech5Encoder(TINY5, rngs=nnx.Rngs(0), **BF16)
    x = jnp.zeros((2, 37, TINY5.input_dim), jnp.bfloat16)
    return traced(model, lambda m, x: m(x, jnp.ones(x.shape[:2], bool)), x)


def encoder_with_lora():
    model = conformer.GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0), **BF16)
    add_lora(model, rank=2)
    x = jnp.zeros((2, 21, TINY.input_dim), jnp.bfloat16)
    return traced(model, lambda m, x: m(x, jnp.ones(x.shape[:2], bool)), x)


def encoder_gradient():
    """The training step's backward pass too: products of cotangents and bf16 weights."""
    model = conformer.GraniteSpeechEncoder(TINY, rngs=nnx.Rngs(0), **BF16)
    x = jnp.zeros((2, 21, TINY.input_dim), jnp.bfloat16)

    def loss(m, x):
        return jnp.sum(m(x, jnp.ones(x.shape[:2], bool)).astype(jnp.float32) ** 2)

    return traced(model, lambda m, x: nnx.grad(loss)(m, x), x)


def q_former():
    pcfg = ProjectorConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8, encoder_hidden_size=32
    )
    model = projector.GraniteSpeechProjector(pcfg, rngs=nnx.Rngs(0), **BF16)
    return traced(model, lambda m, h: m(h), jnp.zeros((2, 31, 32), jnp.bfloat16))


def language_model(rows: int):
    cfg = GraniteConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = granite.GraniteForCausalLM(cfg, rngs=nnx.Rngs(0), **BF16)
    cache = granite.KVCache.zeros(cfg, 2, 16, jnp.bfloat16) if rows == 1 else None

    def step(m, embeds):
        hidden, _ = m(embeds, jnp.zeros(2, jnp.int32), cache)
        return m.logits(hidden)

    return traced(model, step, jnp.zeros((2, rows, 32), jnp.bfloat16))


MODELS = {
    "encoder_4x": encoder_4x,
    "encoder_speech5": encoder_speech5,
    "encoder_with_lora": encoder_with_lora,
    "encoder_gradient": encoder_gradient,
    "q_former": q_former,
    "language_model_prompt": lambda: language_model(5),
    "language_model_step": lambda: language_model(1),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_bf16_product_is_summed_in_fp32(name):
    dots = low_precision_dots(MODELS[name]())
    assert dots, "no bf16 product traced: the check would pass vacuously"
    rounded = [d for d in dots if d[1] != "float32"]
    assert not rounded, f"{len(rounded)} of {len(dots)} bf16 products return 16 bits: {rounded}"


def test_the_check_sees_a_product_summed_in_bf16():
    """The walker finds a bf16-summed product inside a scan (so a regression cannot hide in one)."""
    w = jnp.ones((4, 4), jnp.bfloat16)

    def body(c, _):
        return c @ w, None

    jaxpr = jax.make_jaxpr(lambda x: jax.lax.scan(body, x, None, length=2)[0])(np.ones((2, 4), jnp.bfloat16))
    assert low_precision_dots(jaxpr.jaxpr) == [("bfloat16xbfloat16", "bfloat16")]

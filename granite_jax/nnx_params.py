"""NNX modules <-> flat {path: array} dicts, the converter's and the checkpoint's currency."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

M = TypeVar("M", bound=nnx.Module)


def path_str(path: tuple) -> str:
    """An NNX state path as the dotted name used in checkpoints, e.g. `layers.0.attn.to_q.kernel`."""
    return ".".join(str(p) for p in path)


def abstract_variables(make: Callable[[], nnx.Module]) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of every variable of the module `make()` builds, nothing allocated."""
    model = nnx.eval_shape(make)
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def module_from_params(
    make: Callable[[], M], params: Mapping[str, np.ndarray], *, consume: bool = False, what: str = ""
) -> M:
    """The module `make()` builds, with its variables set from `params` (cast to each variable's dtype).

    `params` may be lazy (read on access). With `consume`, each entry is deleted from `params` once it is
    on the device, so the weights are never held twice. `what` prefixes error messages ("projector ").
    """
    model = nnx.eval_shape(make)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    names = {path_str(p) for p, _ in flat}
    if names != set(params):
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise ValueError(f"{what}parameters do not fit the config: missing {missing}, unexpected {extra}")
    leaves = []
    for path, var in flat:
        name = path_str(path)
        want = var.get_value()
        value = np.asarray(params[name])
        if value.shape != want.shape:
            raise ValueError(f"{what}{name}: shape {value.shape}, config expects {want.shape}")
        leaves.append((path, var.replace(jnp.asarray(value, dtype=want.dtype))))
        del value
        if consume:
            del params[name]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def variables_of(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's variables as a flat {path: numpy array} dict."""
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}

"""Flax NNX models in the same pure train step as Linen ones.

``NNXModel`` puts an NNX module behind the two Linen calls ``TrainState`` and
``train_step`` make: ``init(rngs, x, train=False) -> variables`` and
``apply(variables, x, train=..., rngs=..., mutable=...)``. Inside ``apply`` the
module is rebuilt with ``nnx.merge(graphdef, params, rng_state, rest)``, run,
and its updated non-parameter state (BatchNorm statistics, counters) taken
back out with ``nnx.split``; nothing is mutated outside the traced function,
so the step stays pure and can be jitted, pmapped, sharded or vmapped.

Variables layout (plain nested dicts with string keys, so Orbax, optax and
``jax.tree`` treat them like Linen variables):

- ``"params"``: every ``nnx.Param``;
- ``"nnx_state"``: every other variable except RNG state (present only when
  the module has some, e.g. ``nnx.BatchNorm``'s ``mean``/``var``).

Randomness stays a function of keys: RNG streams are not part of the state;
in ``apply`` every stream (``dropout``, ``default``, ...) is reseeded from the
step's ``rngs`` (one key folded with the stream's index). Train/eval mode is
set with ``module.train()`` / ``module.eval()`` (``Dropout.deterministic``,
``BatchNorm.use_running_average``), and ``train=`` is also passed to the
module's ``__call__`` when it has such a parameter.

Two ways in:

- an NNX *instance* (``create_train_state`` wraps it): its current weights are
  the initial params and the init key is not used (every seed of a seed run
  would start from the same weights);
- a *factory* ``lambda rngs: Net(..., rngs=rngs)`` wrapped as
  ``NNXModel(factory)``: ``init`` builds the module from the init key, so
  initialization depends on the seed like a Linen model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.state import takes_train

PARAMS = "params"
STATE = "nnx_state"


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state)


def _to_pure(state: Any) -> dict[str, Any]:
    """An ``nnx.State`` -> nested dict with string keys (list indices become "0", "1", ...)."""
    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = var.get_value()
    return out


def _from_pure(template: Any, pure: Mapping[str, Any]) -> Any:
    """Values of ``pure`` (layout of ``_to_pure``) in the Variables of ``template``."""
    flat = []
    for path, var in nnx.to_flat_state(template):
        node = pure
        try:
            for k in path:
                node = node[str(k)]
        except (KeyError, TypeError):
            where = "/".join(map(str, path))
            raise ValueError(f"variables lack {where} of the NNX module") from None
        flat.append((path, var.replace(node)))
    return nnx.from_flat_state(flat)


class NNXModel:
    """An NNX module (or a factory ``rngs -> module``) with Linen's ``init``/``apply``.

    ``axis_name`` (set by ``clone`` under ``pmap``) is given to every submodule
    with an ``axis_name`` attribute (``nnx.BatchNorm``), so batch statistics are
    averaged over devices as in the Linen models.
    """

    def __init__(self, module: nnx.Module | Callable[[nnx.Rngs], nnx.Module], *,
                 axis_name: str | None = None):
        if isinstance(module, nnx.Module):
            self._module, self._factory = module, None
            abstract = module
        elif callable(module):
            self._module, self._factory = None, module
            abstract = nnx.eval_shape(lambda: module(nnx.Rngs(0)))
        else:
            raise TypeError(
                f"expected an nnx.Module or a factory rngs -> nnx.Module, got {module!r}")
        graphdef, params, rng, rest = nnx.split(abstract, nnx.Param, nnx.RngState, ...)
        self.graphdef = graphdef
        self._params_t, self._rng_t = _abstract(params), _abstract(rng)
        self._rest_t = _abstract(rest)
        self._streams = sorted({v.tag for _, v in nnx.to_flat_state(rng)
                                if isinstance(v, nnx.RngKey)})
        self._train_kwarg = takes_train(type(abstract))
        self.axis_name = axis_name

    def clone(self, *, axis_name: str | None = None) -> NNXModel:
        new = object.__new__(NNXModel)
        new.__dict__.update(self.__dict__)
        new.axis_name = axis_name
        return new

    # ------------------------------------------------------------------ Linen interface

    def init(self, rngs: jax.Array | Mapping[str, jax.Array], *args: Any, **kwargs: Any
             ) -> dict[str, Any]:
        """Variables ``{"params": ..., ["nnx_state": ...]}``; ``args`` are not needed
        (NNX modules know their shapes) and accepted only for Linen's signature."""
        if self._factory is None:
            _, params, _, rest = nnx.split(self._module, nnx.Param, nnx.RngState, ...)
        else:
            key = rngs.get("params") if isinstance(rngs, Mapping) else rngs
            module = self._factory(nnx.Rngs(_typed_key(key)))
            _, params, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
        variables = {PARAMS: _to_pure(params)}
        if self._has_state:
            variables[STATE] = _to_pure(rest)
        return variables

    @property
    def _has_state(self) -> bool:
        return bool(jax.tree.leaves(self._rest_t))

    def merge(self, variables: Mapping[str, Any], rngs: Mapping[str, jax.Array] | None = None
              ) -> nnx.Module:
        """A fresh NNX module holding ``variables`` (for inspection or NNX-style use)."""
        params = _from_pure(self._params_t, variables[PARAMS])
        rest = _from_pure(self._rest_t, variables.get(STATE, {}))
        rng = jax.tree.map(_placeholder, self._rng_t)
        module = nnx.merge(self.graphdef, params, rng, rest)
        if self.axis_name is not None:
            for _, m in nnx.iter_modules(module):
                if hasattr(m, "axis_name"):
                    m.axis_name = self.axis_name
        if rngs and self._streams:
            base = _typed_key(rngs.get("dropout", next(iter(rngs.values()))))
            nnx.reseed(module, **{s: jax.random.fold_in(base, i)
                                  for i, s in enumerate(self._streams)})
        return module

    def apply(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
              rngs: Mapping[str, jax.Array] | None = None, mutable: Any = False,
              **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` in train or eval mode; with ``mutable`` (a list of
        collection names, as Linen) also returns the updated ``{"nnx_state": ...}``."""
        module = self.merge(variables, rngs)
        if train:
            module.train()
        else:
            module.eval()
        if self._train_kwarg:
            kwargs["train"] = train
        out = module(*args, **kwargs)
        if mutable is False:
            return out
        names = [mutable] if isinstance(mutable, str) else (list(variables) if mutable is True
                                                             else list(mutable))
        new = {}
        if STATE in names and self._has_state:
            _, _, _, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
            new[STATE] = _to_pure(rest)
        return out, new

    def __repr__(self) -> str:
        inner = type(self._module).__name__ if self._module is not None else self._factory
        return f"NNXModel({inner})"


def _typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key (NNX streams hold typed keys) from a raw ``uint32[2]`` or typed key."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
    """A value for an RNG variable; keys are reseeded before any stochastic use."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jnp.broadcast_to(jax.random.key(0), x.shape)
    return jnp.zeros(x.shape, x.dtype)

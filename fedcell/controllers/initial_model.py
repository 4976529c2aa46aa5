"""Where a controller's first model comes from: exactly one of its ``initial_params``, its
``model`` factory (``"package.module:factory"`` returning a dict of arrays or a
``torch.nn.Module``, whose ``state_dict()`` is taken), or the one upstream DAG node whose output
is an FLModel. Shared by every controller that starts from a model (FedAvg, Cyclic, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fedcell.controllers.aggregation import as_params
from fedcell.errors import ConfigError
from fedcell.fl_model import FLModel

__all__ = ["initial_params", "load_model"]


def initial_params(
    owner: str,
    given: Mapping[str, Any] | None,
    model: str | None,
    inputs: Mapping[str, Any],
) -> dict[str, Any]:
    """The first global model of ``owner`` (a node description for error messages).

    Raises
    ------
    ConfigError
        If not exactly one source is given, or the factory cannot be loaded or returns
        something that is not a dict of arrays or a module.
    """
    upstream = {
        name: output
        for name, output in inputs.items()
        if isinstance(output, FLModel) and isinstance(output.params, Mapping)
    }
    sources = [
        what
        for what, present in (
            ("initial_params", given is not None),
            ("model", model is not None),
            (f"upstream node(s) {sorted(upstream)}", bool(upstream)),
        )
        if present
    ]
    if len(sources) != 1 or len(upstream) > 1:
        raise ConfigError(
            f"{owner}: needs exactly one initial model (initial_params, model, or one "
            f"upstream FLModel); got {', '.join(sources) or 'none'}"
        )
    if given is not None:
        return as_params(given)
    if model is not None:
        return as_params(load_model(owner, model))
    (params,) = (output.params for output in upstream.values())
    return as_params(params)


def load_model(owner: str, path: str) -> Mapping[str, Any]:
    """Build the model named ``"package.module:factory"`` and return its parameters.

    Raises
    ------
    ConfigError
        If the factory cannot be imported, is not callable, or returns neither a dict nor a
        module with ``state_dict()``.
    """
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{owner}: cannot import model {path!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{owner}: model {path!r} is {type(factory).__name__}, not callable")
    built = factory()
    if hasattr(built, "state_dict"):
        return {name: value.detach() for name, value in built.state_dict().items()}
    if not isinstance(built, Mapping):
        raise ConfigError(
            f"{owner}: model {path!r} returned {type(built).__name__}, not a dict or module"
        )
    return built

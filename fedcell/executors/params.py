"""Params formats: which array library a training function or script receives its weights in.

The wire carries numpy arrays and torch tensors natively (bfloat16 included), so a model arrives
in whatever library its sender used. Code that wants one library asks for a format:

- ``"pytorch"``: numpy arrays become tensors with ``torch.from_numpy`` (zero-copy);
- ``"numpy"``: tensors become arrays (moved to CPU first); bfloat16 and float8 have no numpy
  dtype and are refused with a message naming the param;
- ``"native"``: nothing changes.

Only the top level of a params mapping (name → array) is converted. Torch is imported only when
a numpy array must become a tensor.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, get_args

import numpy as np

from fedcell.errors import ConfigError

__all__ = ["PARAMS_FORMATS", "ParamsFormat", "convert_params"]

ParamsFormat = Literal["pytorch", "numpy", "native"]
PARAMS_FORMATS: tuple[str, ...] = get_args(ParamsFormat)


def _convert_value(name: str, value: Any, params_format: str) -> Any:
    if params_format == "pytorch":
        if isinstance(value, np.ndarray):
            import torch

            return torch.from_numpy(value)
        return value
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype == "bfloat16" or dtype.startswith("float8"):
            raise ConfigError(
                f"param {name!r} is a {dtype} tensor, which numpy cannot hold; "
                "use params_format='pytorch' or 'native'"
            )
        return value.detach().cpu().numpy()
    return value


def convert_params(params: Any, params_format: str) -> Any:
    """Return ``params`` (name → array/tensor) with its arrays in ``params_format``.

    Anything that is not a mapping (``None``, a list) is returned unchanged.

    Raises
    ------
    ConfigError
        If ``params_format`` is unknown, or a tensor has no numpy equivalent.
    """
    if params_format not in PARAMS_FORMATS:
        raise ConfigError(
            f"params_format must be one of {', '.join(PARAMS_FORMATS)}, not {params_format!r}"
        )
    if params_format == "native" or not isinstance(params, dict):
        return params
    return {name: _convert_value(str(name), v, params_format) for name, v in params.items()}

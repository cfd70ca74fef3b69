"""Replacing a model's `nn.Linear`s by weight-holding twins (fp8, GGUF): the one helper both use."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def replace_linears(model: nn.Module, names: Iterable[str], build: Callable[[str, nn.Linear], nn.Module],
                    holds: str) -> None:
    """Replace each named `nn.Linear` by `build(name, linear)` in place (on meta before loading).

    holds: what the replacement stores, for the error when a name is not a Linear ("fp8", "GGUF blocks").
    """
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear; only Linears can hold {holds}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, build(name, linear))

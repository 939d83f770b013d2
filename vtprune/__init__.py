"""vtprune: plug-in visual token reduction for HuggingFace vision-language models.

    import vtprune
    with vtprune.apply(model, "fastv", keep=64) as pruner:
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruner.stats)
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vtprune.methods import REGISTRY, Method, get_method, support_matrix
from vtprune.methods.compose import Composite, compose
from vtprune.runtime import Pruner, Stats

__version__ = "0.1.0"


def apply(model: nn.Module, method: str | Method, **params: Any) -> Pruner:
    """Install ``method`` (a registered name, a ``Method`` instance, or several methods' stages from ``compose()``)
    on ``model`` until ``remove()`` / exit.

    Parameters are validated before anything is installed, so a bad call leaves the model untouched.
    """
    if isinstance(method, str):
        method = get_method(method)(**params)
    elif params:
        raise TypeError("pass parameters either to the Method instance or to apply(), not both")
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a registered name or a vtprune Method, got {type(method).__name__}")
    return Pruner(model, method).install()


def methods() -> list[dict[str, Any]]:
    """The registry: each method's name, stages, paper, budget convention and parameters with defaults."""
    return [REGISTRY[name].describe() for name in sorted(REGISTRY)]


__all__ = ["Composite", "Method", "Pruner", "Stats", "apply", "compose", "methods", "support_matrix"]

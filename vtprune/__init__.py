"""vtprune: plug-in visual token reduction for HuggingFace vision-language models.

    import vtprune
    with vtprune.apply(model, "fastv", keep=64) as pruner:
        out = model.generate(**inputs, max_new_tokens=32)
    print(pruner.stats)
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from vtprune.methods import Method
    from vtprune.runtime import Pruner

__version__ = "0.1.0"

# Imported on first use, so that `vtprune --help` and `vtprune --version` do not wait for torch.
_LAZY = {
    "REGISTRY": "vtprune.methods", "Method": "vtprune.methods", "get_method": "vtprune.methods",
    "support_matrix": "vtprune.methods", "Composite": "vtprune.methods.compose", "compose": "vtprune.methods.compose",
    "Pruner": "vtprune.runtime", "Stats": "vtprune.runtime",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def apply(model: nn.Module, method: str | Method, **params: Any) -> Pruner:
    """Install ``method`` (a registered name, a ``Method`` instance, or several methods' stages from ``compose()``)
    on ``model`` until ``remove()`` / exit.

    Parameters are validated before anything is installed, so a bad call leaves the model untouched.
    """
    from vtprune.methods import Method, get_method
    from vtprune.runtime import Pruner

    if isinstance(method, str):
        method = get_method(method)(**params)
    elif params:
        raise TypeError("pass parameters either to the Method instance or to apply(), not both")
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a registered name or a vtprune Method, got {type(method).__name__}")
    return Pruner(model, method).install()


def methods() -> list[dict[str, Any]]:
    """The registry: each method's name, stages, paper, budget convention and parameters with defaults."""
    from vtprune.methods import REGISTRY

    return [REGISTRY[name].describe() for name in sorted(REGISTRY)]


class _Package(types.ModuleType):
    """Keeps ``vtprune.methods`` the function above: importing the subpackage ``vtprune.methods`` would otherwise
    set the attribute to the module (the subpackage stays in ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "methods" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["Composite", "Method", "Pruner", "Stats", "apply", "compose", "methods", "support_matrix"]

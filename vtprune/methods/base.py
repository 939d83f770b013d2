"""Method base class: declared parameters with validation, budgets, and the registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vtprune.models.base import Adapter


@dataclass(frozen=True)
class Param:
    """A declared method parameter. ``choices`` restricts values; ``doc`` appears in ``vtprune.methods()``."""

    name: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None


BUDGET_PARAMS = (
    Param("keep", None, "visual tokens kept per image (see the method's budget convention)"),
    Param("ratio", None, "fraction of visual tokens kept per image, used when keep is not given"),
)
POSITION_PARAM_DOC = "RoPE positions of kept tokens: 'original' (their place in the full prompt) or 'renumber'"


class Method:
    """A token-reduction method: parameters plus the stage operators it contributes.

    Subclasses set ``name``, ``paper``, ``stages``, ``budget_convention``, ``params`` (``BUDGET_PARAMS`` are added
    for every method with ``default_ratio``) and implement ``operators``.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    budget_convention: ClassVar[str] = "visual tokens per image entering the LLM"
    default_ratio: ClassVar[float] = 0.25
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **values: Any) -> None:
        declared = {p.name: p for p in (*BUDGET_PARAMS, *self.params)}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise TypeError(
                f"{self.name} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are: {', '.join(declared)}"
            )
        for param in declared.values():
            value = values.get(param.name, param.default)
            if param.choices is not None and value not in param.choices:
                raise ValueError(f"{self.name}: {param.name}={value!r} must be one of {param.choices}")
            setattr(self, param.name, value)
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"{self.name}: give either keep= or ratio=, not both")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep <= 0):
            raise ValueError(f"{self.name}: keep={self.keep!r} must be a positive number of tokens (e.g. keep=64)")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"{self.name}: ratio={self.ratio!r} must be in (0, 1] (e.g. ratio=0.25 keeps a quarter)")

    def budget(self, n: int) -> int:
        """Tokens kept out of ``n`` visual tokens of one image; raises if the budget exceeds ``n``."""
        keep = self.keep if self.keep is not None else round((self.ratio or self.default_ratio) * n)
        if keep > n:
            raise ValueError(
                f"{self.name}: keep={keep} is larger than the {n} visual tokens per image; use keep <= {n}"
            )
        return max(1, keep)

    def operators(self, adapter: Adapter) -> list:
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        params = (*BUDGET_PARAMS, *cls.params)
        return {
            "name": cls.name,
            "stages": cls.stages,
            "paper": cls.paper,
            "budget": cls.budget_convention,
            "params": {p.name: {"default": p.default, "doc": p.doc, "choices": p.choices} for p in params},
            "default_ratio": cls.default_ratio,
        }

    def __repr__(self) -> str:
        names = [p.name for p in (*BUDGET_PARAMS, *self.params)]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


def scaled_layer(paper_layer: int, paper_depth: int, depth: int) -> int:
    """A paper's layer index moved proportionally to a model of ``depth`` layers (at least layer 1)."""
    return max(1, round(paper_layer * depth / paper_depth))


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]

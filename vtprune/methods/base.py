"""Method base class: typed, validated parameters, budgets, capability requirements, and the registry."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from vtprune.models.base import CAPABILITIES, Adapter
from vtprune.runtime.operators import PreLLMOperator


@dataclass(frozen=True)
class Param:
    """A declared method parameter, checked when the method is built (so before anything is installed).

    ``kind``: int, float, bool, str or tuple (a non-empty sequence of distinct integers, stored ascending, each
    checked against the bounds; e.g. layer lists); numpy scalars are accepted and a bool is never taken for a
    number. ``choices``: allowed values; ``low``/``high``: bounds (``low_open``: the low bound itself is excluded); a
    ``None`` value is allowed only where the default is ``None``.
    """

    name: str
    default: Any
    doc: str
    kind: type = object
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def check(self, method: str, value: Any) -> Any:
        given = value
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{method}: {self.name}=None is not allowed; its default is {self.default!r}")
        if self.kind is tuple:
            return self._check_sequence(method, value)
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{method}: {self.name}={value!r} must be an integer")
            value = int(value)
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{method}: {self.name}={value!r} must be a number")
            value = float(value)
        elif self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{method}: {self.name}={value!r} must be True or False")
            value = bool(value)
        elif self.kind is str and not isinstance(value, str):
            raise ValueError(f"{method}: {self.name}={value!r} must be one of {self.choices}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{method}: {self.name}={given!r} must be one of {self.choices}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            bound = f"> {self.low}" if self.low_open else f">= {self.low}"
            raise ValueError(f"{method}: {self.name}={given!r} must be {bound}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{method}: {self.name}={given!r} must be <= {self.high}")
        return value

    def _check_sequence(self, method: str, value: Any) -> tuple[int, ...]:
        items = list(value) if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) else None
        if not items or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
            raise ValueError(f"{method}: {self.name}={value!r} must be a non-empty list of integers, e.g. (2, 4, 6)")
        numbers_ = [int(v) for v in items]
        if len(set(numbers_)) != len(numbers_):
            raise ValueError(f"{method}: {self.name}={value!r} lists a value twice")
        for v in numbers_:
            if self.low is not None and v < self.low:
                raise ValueError(f"{method}: {self.name}={value!r}: every entry must be >= {self.low}")
            if self.high is not None and v > self.high:
                raise ValueError(f"{method}: {self.name}={value!r}: every entry must be <= {self.high}")
        return tuple(sorted(numbers_))


BUDGET_PARAMS = (
    Param("keep", None, "visual tokens kept (see the method's budget convention)", int, low=1),
    Param("ratio", None, "fraction of visual tokens kept, used when keep is not given", float, low=0, high=1,
          low_open=True),
)
COMMON_PARAMS = (
    Param("positions", None, "RoPE positions of kept tokens: 'original' (their place in the full prompt) or "
          "'renumber' (contiguous, as LLaVA's own pipeline feeds a shortened prompt); None: the method's default "
          "('original' on 3-D M-RoPE models)", str, ("original", "renumber")),
    Param("separators", None, "LLaVA-NeXT's newline tokens: 'candidates' (ranked like any visual token), 'keep' "
          "(always kept, outside the budget), 'rows' (kept while a token of their row survives, outside the "
          "budget) or 'drop' (gone from an image once any of its tokens is dropped; an image kept whole keeps them); "
          "None: the method's default", str, ("candidates", "keep", "rows", "drop")),
)


class Method:
    """A token-reduction method: parameters plus the stage operators it contributes.

    Subclasses set ``name``, ``paper``, ``stages``, ``budget_convention``, ``params``, ``default_ratio``,
    ``default_positions`` and ``default_separators`` (the paper's), ``requires`` (adapter capabilities, see
    ``vtprune.models.CAPABILITIES``), and implement ``operators``.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    budget_convention: ClassVar[str] = "visual tokens per image entering the LLM"
    default_ratio: ClassVar[float] = 0.25
    default_positions: ClassVar[str] = "original"
    default_separators: ClassVar[str] = "rows"
    requires: ClassVar[frozenset[str]] = frozenset()
    params: ClassVar[tuple[Param, ...]] = ()
    learned_budget: ClassVar[bool] = False  # counts come from trained weights; keep/ratio are refused

    def __init__(self, **values: Any) -> None:
        declared = {p.name: p for p in self.all_params()}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise TypeError(
                f"{self.name} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are: {', '.join(declared)}"
            )
        for param in declared.values():
            setattr(self, param.name, param.check(self.name, values.get(param.name, param.default)))
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"{self.name}: give either keep= or ratio=, not both")
        if self.separators is None:
            self.separators = self.default_separators

    @classmethod
    def all_params(cls) -> tuple[Param, ...]:
        return (*BUDGET_PARAMS, *cls.params, *COMMON_PARAMS)

    # --- budgets ------------------------------------------------------------------------------------------------
    def budget(self, n: int) -> int:
        """Tokens kept out of ``n`` candidates: ``keep`` (at most ``n``: a smaller image keeps all it has) or
        ``round(ratio * n)``, at least 1 when the image has any token."""
        keep = self.keep if self.keep is not None else round((self.ratio or self.default_ratio) * n)
        return min(max(1, keep), n)

    def budgets(self, counts: torch.Tensor) -> torch.Tensor:
        """``budget`` applied to a tensor of candidate counts (same rounding)."""
        if self.keep is not None:
            keep = torch.full_like(counts, self.keep)
        else:
            keep = (counts.double() * (self.ratio or self.default_ratio)).round().long()
        return torch.minimum(keep.clamp_min(1), counts)

    def check_budget(self, adapter: Adapter, per: str = "image") -> None:
        """Refuse at apply() a ``keep`` larger than a fixed-layout image has (LLaVA-1.5's 576)."""
        fixed = adapter.fixed_tokens_per_image
        if self.keep is not None and fixed is not None and self.keep > fixed:
            raise ValueError(
                f"{self.name}: keep={self.keep} is larger than the {fixed} visual tokens per {per}; use keep <= {fixed}"
            )

    # --- model support ------------------------------------------------------------------------------------------
    def check_support(self, adapter: Adapter) -> None:
        missing = sorted(self.requires - adapter.capabilities)
        if missing:
            needs = "; ".join(CAPABILITIES[m] for m in missing)
            families = ", ".join(self.describe()["families"])
            raise TypeError(
                f"{self.name} needs a model where {needs}, which is not the case for {type(adapter.model).__name__} "
                f"({adapter.family}); {self.name} runs on: {families}. Methods that run on it: "
                f"{', '.join(supported_methods(type(adapter)))}"
            )

    def resolve_positions(self, adapter: Adapter) -> str:
        """'original' or 'renumber' for this model (refusing renumbering where positions are 3-D)."""
        self.check_support(adapter)
        if adapter.position_dims != 1:
            if self.positions == "renumber":
                raise ValueError(
                    f"{self.name}: positions='renumber' has no meaning for {adapter.family}'s 3-D M-RoPE positions "
                    "(temporal, height, width); use positions='original', the default there"
                )
            return "original"
        return self.positions or self.default_positions

    def operators(self, adapter: Adapter) -> list:
        raise NotImplementedError

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        """The settings this method actually runs with on ``adapter``'s model where they are derived (scaled layers,
        solved schedules), JSON-ready; stored with bench results. Empty when nothing is derived."""
        return {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        from vtprune.models import ADAPTERS

        return {
            "name": cls.name,
            "stages": cls.stages,
            "paper": cls.paper,
            "budget": cls.budget_convention,
            "params": {p.name: {"default": p.default, "doc": p.doc, "choices": p.choices} for p in cls.all_params()},
            "default_ratio": cls.default_ratio,
            "default_positions": cls.default_positions,
            "default_separators": cls.default_separators,
            "requires": sorted(cls.requires),
            "families": [a.family for a in ADAPTERS if cls.requires <= a.capabilities],
        }

    def __repr__(self) -> str:
        names = [p.name for p in self.all_params()]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"


class ImageReducer(PreLLMOperator):
    """A method's pre-LLM operator that reduces every image on its own (``reduce_image``), with the method's
    parameters at hand."""

    def __init__(self, method: Method) -> None:
        self.method = method


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


def supported_methods(adapter_cls: type[Adapter]) -> list[str]:
    return sorted(name for name, cls in REGISTRY.items() if cls.requires <= adapter_cls.capabilities)


def support_matrix() -> dict[str, dict[str, bool]]:
    """{method: {family: runs on it}}, from each method's ``requires`` and each adapter's ``capabilities``."""
    from vtprune.models import ADAPTERS

    return {name: {a.family: cls.requires <= a.capabilities for a in ADAPTERS}
            for name, cls in sorted(REGISTRY.items())}


def support_table() -> str:
    """The support matrix as the Markdown table the README shows (regenerate with ``vtprune methods --markdown``)."""
    from vtprune.models import ADAPTERS

    families = [a.family for a in ADAPTERS]
    lines = ["| method | stages | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for name, supported in support_matrix().items():
        cls = REGISTRY[name]
        marks = " | ".join("yes" if supported[f] else "no (needs " + ", ".join(sorted(cls.requires)) + ")"
                           for f in families)
        lines.append(f"| `{name}` | {', '.join(cls.stages)} | {marks} |")
    return "\n".join(lines)

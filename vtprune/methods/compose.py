"""Several methods' stages in one pruner (``vtprune.compose``), e.g. MustDrop's ViT merging with FastV's drop, or FastV's
prefill with MustDrop's decode-time eviction."""
from __future__ import annotations

from typing import Any

from vtprune.methods.base import Method, get_method
from vtprune.models.base import Adapter
from vtprune.runtime.operators import PreLLMOperator, VisionOperator


def _instance(item: str | Method | tuple[str, dict[str, Any]]) -> Method:
    if isinstance(item, Method):
        return item
    if isinstance(item, str):
        return get_method(item)()
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
        return get_method(item[0])(**item[1])
    raise TypeError(f"compose() takes method names, (name, params) pairs or Method instances; got {item!r}")


class Composite(Method):
    """The operators of several methods, applied in the stage order of the runtime (vision, pre-LLM, layers, decode).

    Each method keeps its own parameters and budget convention. Refused at ``apply()``: two methods that both act
    inside the vision tower or both reduce images before the LLM (one operator owns each of those stage points),
    two layer operators at the same layer, and methods whose ``positions`` disagree, or whose ``separators`` do on a
    model with separator tokens (pass the same value to each).
    """

    name = "compose"
    paper = "(each composed method's)"
    stages = ()

    def __init__(self, *methods: str | Method | tuple[str, dict[str, Any]]) -> None:
        if len(methods) < 2:
            raise ValueError("compose() needs at least two methods, e.g. compose('mustdrop_vision', ('fastv', "
                             "{'keep': 64}))")
        self.parts = [_instance(m) for m in methods]
        self.name = "+".join(part.name for part in self.parts)
        self.stages = tuple(dict.fromkeys(stage for part in self.parts for stage in part.stages))
        self.requires = frozenset().union(*(part.requires for part in self.parts))
        self.keep = self.ratio = None
        self.positions = None
        self.separators = self.parts[0].separators

    def check_support(self, adapter: Adapter) -> None:
        for part in self.parts:
            part.check_support(adapter)

    def resolve_positions(self, adapter: Adapter) -> str:
        separators = {part.name: part.separators for part in self.parts}
        if adapter.separator_tokens and len(set(separators.values())) > 1:
            raise ValueError(f"{self.name}: the methods handle newline separators differently ({separators}); pass "
                             "the same separators= to each")
        resolved = {part.name: part.resolve_positions(adapter) for part in self.parts}
        if len(set(resolved.values())) > 1:
            raise ValueError(f"{self.name}: the methods place kept tokens differently ({resolved}); pass the same "
                             "positions= ('original' or 'renumber') to each")
        return next(iter(resolved.values()))

    def operators(self, adapter: Adapter) -> list:
        operators, owners = [], {}
        for part in self.parts:
            ops = part.operators(adapter)
            for kind, label in ((VisionOperator, "inside the vision tower"), (PreLLMOperator, "before the LLM")):
                if any(isinstance(op, kind) for op in ops):
                    if kind in owners:
                        raise ValueError(f"{self.name}: {owners[kind]} and {part.name} both act {label}; compose "
                                         "methods that act at different stage points")
                    owners[kind] = part.name
            operators += ops
        layers = [layer for op in operators if getattr(op, "stage", None) == "layer" for layer in op.layers]
        if len(layers) != len(set(layers)):
            raise ValueError(f"{self.name}: two methods change the token set before the same decoder layer "
                             f"({sorted(layers)}); move one with its layer parameter")
        return operators

    def resolved(self, adapter: Adapter) -> dict[str, Any]:
        return {part.name: part.resolved(adapter) for part in self.parts}

    def __repr__(self) -> str:
        return f"Composite({', '.join(map(repr, self.parts))})"


def compose(*methods: str | Method | tuple[str, dict[str, Any]]) -> Composite:
    """One method made of several: ``vtprune.apply(model, vtprune.compose("mustdrop_vision", ("fastv", {"keep":
    64})))``. See ``Composite`` for what is refused."""
    return Composite(*methods)

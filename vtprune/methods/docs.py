"""What the registry says about its methods, for people: ``docs/methods.md`` (``methods_markdown``, written by
``vtprune methods --docs``; a test keeps the file in sync) and the defaults each method resolves to on one model
(``defaults_on``, shown by ``vtprune methods --model NAME``)."""
from __future__ import annotations

import inspect
import re
from typing import Any

from vtprune.methods.base import REGISTRY, Method, support_matrix, supported_methods

INTRO = """# Methods

Generated from the method registry (`vtprune/methods/`, one file per method) by `vtprune methods --docs`; a test
keeps this file in sync with the code, so edit the docstrings, not this page. `vtprune methods --model NAME` shows
the defaults each method resolves to on a given model (scaled layers, solved schedules) and, on a shipped reference
model, what the defaults keep.

Conventions shared by every method:

- **Budgets.** `keep=` (a count) or `ratio=` (a share), never both, in the method's own *budget convention* (the
  column below): most count visual tokens per image entering the LLM, some count tokens after their last cut, per
  336-px view, or averaged over all decoder layers, as their papers do. `pruner.stats` reports both common units
  for every run (`llm_input_visual_tokens`, `mean_visual_tokens`). Without a budget a method runs with its paper's
  default (a ratio, a per-block merge count, thresholds or learned weights: see each method).
- **Layers.** Layer defaults are the paper's for its model's depth and scale proportionally on other depths
  (`max(1, round(K * L / 32))`).
- **Positions.** `positions='original'` keeps each survivor's place in the full prompt; `'renumber'` gives
  contiguous positions, as LLaVA's own pipeline feeds a shortened prompt. The default is the paper's, and always
  `'original'` on Qwen's 3-D M-RoPE.
- **Separators.** `separators=` decides LLaVA-NeXT's newline tokens: `'candidates'`, `'keep'`, `'rows'` or
  `'drop'` (see the parameter table below).
- **Support.** A method that needs a vision-tower [CLS] token (`cls`) or merging inside the vision tower
  (`vision_merge`) is refused, with the list of methods that do run, on a model without it.
- **[GAP].** Marks a detail the paper (and its code, where there is any) leaves open; the docstring says what
  vtprune chose, and the choice is a parameter.
"""


def _markdown(text: str) -> str:
    """A docstring's reStructuredText literals and roles (``x``, :class:`x`) as Markdown code."""
    text = re.sub(r":(?:class|func|mod|meth):`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _params_table(cls: type[Method]) -> list[str]:
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for param in cls.all_params():
        default = "unset" if param.default is None else f"`{param.default!r}`"
        rows.append(f"| `{param.name}` | {default} | {_cell(_markdown(param.doc))} |")
    return rows


def methods_markdown() -> str:
    """The text of ``docs/methods.md``."""
    matrix = support_matrix()
    lines = [INTRO, "| method | stages | paper | budget convention | runs on |", "|---|---|---|---|---|"]
    for name, cls in sorted(REGISTRY.items()):
        runs_on = ", ".join(family for family, runs in matrix[name].items() if runs)
        lines.append(f"| [`{name}`](#{name}) | {', '.join(cls.stages)} | {_cell(cls.paper)} | "
                     f"{_cell(cls.budget_convention)} | {runs_on} |")
    for name, cls in sorted(REGISTRY.items()):
        own = [p.name for p in cls.params]
        lines += ["", f"## {name}", "", _markdown(inspect.cleandoc(cls.__doc__ or "")), "",
                  f"- stages: {', '.join(cls.stages)}", f"- budget convention: {cls.budget_convention}",
                  f"- defaults: positions `{cls.default_positions}`, separators `{cls.default_separators}`"
                  + ("; the budget is learned (keep/ratio refused)" if cls.learned_budget else ""),
                  f"- needs: {', '.join(sorted(cls.requires)) or 'nothing beyond a supported model'}",
                  f"- its own parameters: {', '.join(f'`{p}`' for p in own) or 'none'}", ""]
        lines += _params_table(cls)
    return "\n".join(lines) + "\n"


def defaults_on(model, inputs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per registered method, what it runs with on ``model`` when given nothing: ``settings`` (its parameters, with
    the values it derives for this model where it derives them, e.g. FastV's layer on an 8-layer LLM), ``plan`` (other
    derived values, e.g. a solved schedule), ``unset`` ({parameter: what it does} for optional ones left unset), and
    with ``inputs`` (one processed image and prompt) ``measured``: visual tokens entering the LLM, alive after the
    last layer and averaged over layers. Methods the model does not support carry ``unsupported`` (the reason)."""
    import torch

    import vtprune
    from vtprune.models import adapter_for

    adapter = adapter_for(model)
    runnable = set(supported_methods(type(adapter)))
    out = []
    for name, cls in sorted(REGISTRY.items()):
        entry: dict[str, Any] = {"name": name, "paper": cls.paper, "stages": cls.stages,
                                 "budget": cls.budget_convention}
        out.append(entry)
        if name not in runnable:
            entry["unsupported"] = f"needs {', '.join(sorted(cls.requires - adapter.capabilities))}"
            continue
        method = cls()
        try:
            resolved = method.resolved(adapter)
        except ValueError as error:  # e.g. a learned method without weights for this model
            entry["unsupported"] = str(error)
            continue
        settings, unset = {}, {}
        for param in cls.all_params():
            if param.name in ("keep", "ratio"):
                continue
            value = resolved.get(param.name, getattr(method, param.name))
            if param.name == "positions":
                value = method.resolve_positions(adapter)
            if value is None:
                unset[param.name] = param.doc
            else:
                settings[param.name] = value
        entry.update(settings=settings, unset=unset,
                     plan={k: v for k, v in resolved.items() if k not in settings})
        if inputs is not None:
            with torch.no_grad(), vtprune.apply(model, name) as pruner:
                model(**inputs, logits_to_keep=1)
            visual = pruner.stats.visual_tokens[0].double()
            entry["measured"] = {"entering": int(visual[0]), "alive_after_last_layer": int(visual[-1]),
                                 "layer_average": round(float(visual.mean()), 1)}
    return out

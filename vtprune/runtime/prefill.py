"""Prefill: the sequence that enters the LLM (the prompt with each image's reduced tokens), and the token set that
changes from layer to layer inside it.

The LLM-input sequence (``Universe``) is fixed for the whole prefill. Every later token set is a list of rows into
it (``TokenSet.rows``, left-padded, always in sequence order) with the hidden states the tokens have at that layer,
so dropping is a gather, bringing tokens back is a sorted union, and positions and metadata are always looked up,
never recomputed. Separator tokens (LLaVA-NeXT's newlines) follow the method's policy:
``candidates`` (ordinary visual tokens), ``keep`` (always kept, outside the budget), ``rows`` (kept exactly while a
token of the grid row they close survives; outside the budget) or ``drop`` (removed from an image as soon as the
method drops or merges any of its tokens; an image left whole keeps the model's packing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.models.base import Adapter, ImageRecord
from vtprune.models.layout import TokenKind
from vtprune.ops import Sources
from vtprune.runtime.operators import ImageTokens, PreLLMContext, PreLLMOperator, Reduction, Transition
from vtprune.runtime.sequence import gather_rows, keep_index, left_pad, renumber

SEPARATOR_POLICIES = ("candidates", "keep", "rows", "drop")


@dataclass
class PlacedImage:
    """An image and the placeholder run it fills: row ``sample``, columns ``start`` .. ``start + length - 1``."""

    record: ImageRecord
    sample: int
    start: int
    length: int
    number: int = 0


def place_images(input_ids: torch.Tensor, modalities: list[tuple[int, list[ImageRecord]]]) -> list[PlacedImage]:
    """Match images to their placeholder runs in row-major order (as the model's ``masked_scatter`` fills them), per
    placeholder token id; each image must be one contiguous run of its layout's length."""
    placed = []
    for token_id, records in modalities:
        where = (input_ids == token_id).nonzero().tolist()  # one host sync per prefill
        need = sum(len(record.layout) for record in records)
        if len(where) != need:
            raise ValueError(f"{len(records)} images need {need} placeholder tokens (id {token_id}); input_ids has "
                             f"{len(where)}")
        cursor = 0
        for record in records:
            length = len(record.layout)
            (row, start), (last_row, end) = where[cursor], where[cursor + length - 1]
            if last_row != row or end - start != length - 1:
                raise ValueError(
                    f"the {length} placeholder tokens of an image must be consecutive; row {row} has a gap from "
                    f"column {start} (use the processor's prompt, which expands each image token in one run)"
                )
            placed.append(PlacedImage(record, row, start, length))
            cursor += length
    placed.sort(key=lambda image: (image.sample, image.start))
    for image, previous in zip(placed[1:], placed[:-1]):
        image.number = previous.number + 1 if previous.sample == image.sample else 0
    return placed


@dataclass
class Universe:
    """The LLM-input sequence, [B, n0] unless noted.

    ``origin``: input column of text tokens (-1 visual and padding); ``image``/``kind``/``partition`` and
    ``grid``/``row``/``col`` (its place on its image's grid; a merged token's rounded mean): per visual token (-1
    text); ``tags``: per-token values a pre-LLM operator attached (0 elsewhere); ``candidate``: visual tokens layer
    operators decide over; ``group``: a visual token's
    (image, grid, row) group id, for a separator the group it closes; ``grid_group``: a content token's (image, grid)
    id; ``visual_index``: its row in ``sources[b]``, which gives every visual token's weights over the sample's
    layout tokens (images concatenated); ``shift`` [B]: original next position minus this sequence's (renumbering);
    ``token_ids``: the prompt's token id of every text token (-1 visual and padding), for operators whose query is a
    given token (LVLM_CSP's [SEG]); None when the input ids were not given.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    origin: torch.Tensor
    image: torch.Tensor
    kind: torch.Tensor
    partition: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    tags: dict[str, torch.Tensor]
    candidate: torch.Tensor
    group: torch.Tensor
    grid_group: torch.Tensor
    visual_index: torch.Tensor
    image_candidates: torch.Tensor
    shift: torch.Tensor
    sources: list[Sources]
    layout_sizes: list[list[int]]
    images: list[list[PlacedImage]]
    token_ids: torch.Tensor | None = None

    @property
    def visual(self) -> torch.Tensor:
        return self.kind >= 0

    @property
    def separator(self) -> torch.Tensor:
        return self.kind == int(TokenKind.SEPARATOR)


def _image_tokens(image: PlacedImage, span: torch.Tensor, policy: str) -> ImageTokens:
    layout, record = image.record.layout, image.record
    if record.merged is not None:
        features, sources = record.merged
        features = features.to(span.dtype)
        if policy == "candidates" and layout.has_separators:
            features = torch.cat([features, span[layout.separators]])
            sources = Sources.cat([sources, Sources.one_hot(layout.separators)])
    else:
        index = layout.content if policy != "candidates" else torch.arange(len(layout), device=span.device)
        features, sources = span[index], Sources.one_hot(index)
    return ImageTokens(features, sources, layout, record, image.sample, image.number)


def _finish_image(reduction: Reduction, image: PlacedImage, span: torch.Tensor, span_positions: torch.Tensor,
                  policy: str) -> tuple[torch.Tensor, Sources, torch.Tensor, torch.Tensor]:
    """The image's tokens as they enter the LLM: the reduction plus its separators, in order, with positions, and
    the order (over the reduction's tokens, then the separators added) they were put in."""
    layout = image.record.layout
    features, sources = reduction.features.to(span.dtype), reduction.sources
    order = torch.arange(len(sources), device=span.device)
    separators = layout.separators
    if policy == "drop" and layout.has_separators:  # an image kept whole keeps its separators, any other loses them
        covered = sources.coverage(len(layout))[layout.content] > 0
        separators = separators if len(sources) == len(layout.content) and bool(covered.all()) else separators[:0]
    if layout.has_separators and policy != "candidates":
        if policy == "rows":  # a separator stays while a token of the row it closes (row -1: of its grid) does
            rows, grids = sources.mean(layout.row).round().long(), sources.mean(layout.grid).round().long()
            same_grid = layout.grid[separators][:, None] == grids[None]
            same_row = (layout.row[separators][:, None] == rows[None]) | (layout.row[separators][:, None] < 0)
            separators = separators[(same_grid & same_row).any(1)]
        features = torch.cat([features, span[separators]])
        sources = Sources.cat([sources, Sources.one_hot(separators)])
        order = sources.mean(torch.arange(len(layout), device=span.device)).argsort(stable=True)
        features, sources = features[order], sources.select(order)
    positions = sources.mean(span_positions.T.float()).round().long().T  # [P, k]
    return features, sources, positions, order


def build_universe(
    adapter: Adapter,
    embeds: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    placed: list[PlacedImage],
    pre_llm: PreLLMOperator | None,
    policy: str,
    renumber_positions: bool,
    seed: int,
    input_ids: torch.Tensor | None = None,
) -> Universe:
    """The LLM-input sequence: text tokens as they are, each image's placeholder run replaced by its reduced
    tokens. ``positions`` [P, B, n]: the model's own position ids for the full prompt; ``input_ids`` [B, n] (optional):
    the prompt's ids, read back as ``Universe.token_ids``."""
    batch, device = embeds.shape[0], embeds.device
    spans = [embeds[image.sample, image.start:image.start + image.length] for image in placed]
    tokens = [_image_tokens(image, span, policy) for image, span in zip(placed, spans)]
    if pre_llm is not None:  # selections are not differentiable, the features they keep are
        reductions = pre_llm.reduce(PreLLMContext(adapter, tokens, seed))
    else:
        reductions = [Reduction(t.features, t.sources) for t in tokens]

    rows: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(batch)]
    sources: list[list[Sources]] = [[] for _ in range(batch)]
    sizes: list[list[int]] = [[] for _ in range(batch)]
    images: list[list[PlacedImage]] = [[] for _ in range(batch)]
    tag_names = sorted({name for reduction in reductions for name in reduction.tags})
    height = max([h for image in placed for h, _ in image.record.layout.grid_shapes] + [1]) + 2
    stride = height * max([len(image.record.layout.grid_shapes) for image in placed] + [1])
    cursors = [0] * batch

    def text(b: int, end: int) -> None:
        start = cursors[b]
        piece = rows[b]
        count = end - start
        piece.setdefault("hidden", []).append(embeds[b, start:end])
        piece.setdefault("positions", []).append(positions[:, b, start:end])
        piece.setdefault("valid", []).append(valid[b, start:end])
        piece.setdefault("origin", []).append(torch.arange(start, end, device=device))
        for name in ("image", "kind", "partition", "grid", "row", "col", "group", "grid_group", "visual_index"):
            piece.setdefault(name, []).append(torch.full((count,), -1, device=device))
        for name in tag_names:
            piece.setdefault("tag:" + name, []).append(torch.zeros(count, device=device))
        piece.setdefault("candidate", []).append(torch.zeros(count, dtype=torch.bool, device=device))
        cursors[b] = end

    for image, span, reduction in zip(placed, spans, reductions):
        b, layout = image.sample, image.record.layout
        text(b, image.start)
        span_positions = positions[:, b, image.start:image.start + image.length]
        features, image_sources, image_positions, order = _finish_image(reduction, image, span, span_positions,
                                                                         policy)
        k = len(image_sources)
        strongest = image_sources.strongest()
        kind = layout.kind[strongest]
        row = image_sources.mean(layout.row).round().long()
        grid = image_sources.mean(layout.grid).round().long()
        base = image.number * stride + grid * height
        piece = rows[b]
        piece["grid"].append(grid)
        piece["row"].append(row)
        piece["col"].append(image_sources.mean(layout.col).round().long())
        for name in tag_names:
            tag = reduction.tags.get(name)
            tag = torch.zeros(len(reduction.sources), device=device) if tag is None else tag.float()
            piece["tag:" + name].append(torch.cat([tag, tag.new_zeros(k - len(tag))])[order])
        piece["hidden"].append(features)
        piece["positions"].append(image_positions)
        piece["valid"].append(torch.ones(k, dtype=torch.bool, device=device))
        piece["origin"].append(torch.full((k,), -1, device=device))
        piece["image"].append(torch.full((k,), image.number, device=device))
        piece["kind"].append(kind)
        piece["partition"].append(layout.partition[strongest])
        piece["group"].append(base + row + 1)
        separator = kind == int(TokenKind.SEPARATOR)
        piece["grid_group"].append(torch.where(separator, -1, base))
        piece["candidate"].append(torch.ones_like(separator) if policy == "candidates" else ~separator)
        done = sum(len(s) for s in sources[b])
        piece["visual_index"].append(torch.arange(done, done + k, device=device))
        sources[b].append(image_sources.shift(sum(sizes[b])))
        sizes[b].append(len(layout))
        images[b].append(image)
        cursors[b] = image.start + image.length
    for b in range(batch):
        text(b, embeds.shape[1])

    def stack(name: str, fill) -> torch.Tensor:
        return left_pad([torch.cat(piece[name]) for piece in rows], fill)

    new_positions = left_pad([torch.cat(piece["positions"], dim=1).T for piece in rows], 0).permute(2, 0, 1)
    new_valid = stack("valid", False)
    shift = torch.zeros(batch, dtype=torch.long, device=device)
    if renumber_positions:
        renumbered = renumber(new_valid)[None]
        shift = positions[0, :, -1] - renumbered[0, :, -1]
        new_positions = renumbered
    image_rows = stack("image", -1)
    candidate = stack("candidate", False)
    origin = stack("origin", -1)
    token_ids = None
    if input_ids is not None:
        token_ids = input_ids.to(device).gather(1, origin.clamp_min(0)).masked_fill((origin < 0) | ~new_valid, -1)
    count = max([image.number + 1 for image in placed] + [1])
    image_candidates = torch.zeros(batch, count, dtype=torch.long, device=device)
    image_candidates.scatter_add_(1, image_rows.clamp_min(0), candidate.long())
    return Universe(
        hidden=stack("hidden", 0.0), positions=new_positions.contiguous(), valid=new_valid, origin=origin,
        image=image_rows, kind=stack("kind", -1), partition=stack("partition", -1), grid=stack("grid", -1),
        row=stack("row", -1), col=stack("col", -1), tags={name: stack("tag:" + name, 0.0) for name in tag_names},
        candidate=candidate,
        group=stack("group", -1), grid_group=stack("grid_group", -1), visual_index=stack("visual_index", -1),
        image_candidates=image_candidates, shift=shift,
        sources=[Sources.cat(s) if s else Sources.one_hot(torch.zeros(0, dtype=torch.long, device=device))
                 for s in sources],
        layout_sizes=sizes, images=images, token_ids=token_ids,
    )


@dataclass
class TokenSet:
    """The tokens entering a decoder layer: ``rows`` [B, n] into the universe (-1: padding), their ``hidden``
    [B, n, D], ``positions`` [P, B, n], merge ``size`` [B, n] and (training mode) soft key ``weight`` [B, n]."""

    rows: torch.Tensor
    hidden: torch.Tensor
    positions: torch.Tensor
    size: torch.Tensor
    weight: torch.Tensor | None = None
    version: int = 0

    @property
    def valid(self) -> torch.Tensor:
        return self.rows >= 0

    def lookup(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` [B, n0] read at the current rows (-1 on padding)."""
        return table.gather(1, self.rows.clamp_min(0)).masked_fill(~self.valid, -1) if table.dtype != torch.bool \
            else table.gather(1, self.rows.clamp_min(0)) & self.valid


@dataclass
class Prefill:
    """Prefill state of one forward: the universe, the current token set, which universe token each original one is
    represented by (``owner`` [B, n0], -1 once dropped), and what every layer saw (``tracks``)."""

    universe: Universe
    tokens: TokenSet
    owner: torch.Tensor
    original_next: torch.Tensor
    tracks: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)
    layer_inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    rope: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    mask: tuple[int, torch.Tensor | None] | None = None
    shift: torch.Tensor | None = None
    input_length: int = 0

    @staticmethod
    def start(universe: Universe, original_next: torch.Tensor, input_length: int) -> Prefill:
        batch, n = universe.valid.shape
        rows = torch.arange(n, device=universe.valid.device).expand(batch, n).masked_fill(~universe.valid, -1)
        tokens = TokenSet(rows, universe.hidden, universe.positions,
                          torch.ones(batch, n, dtype=torch.float32, device=rows.device))
        owner = rows.masked_fill(~universe.visual, -1)
        return Prefill(universe, tokens, owner, original_next, shift=universe.shift, input_length=input_length)


def apply_transition(prefill: Prefill, change: Transition, policy: str, renumber_positions: bool) -> None:
    """Apply a layer operator's ``change`` to the prefill's current token set (see ``Transition``)."""
    universe, tokens = prefill.universe, prefill.tokens
    valid = tokens.valid
    candidate = tokens.lookup(universe.candidate)
    hidden, size, weight = tokens.hidden, tokens.size, tokens.weight
    if change.weight is not None:
        soft = torch.where(candidate, change.weight.to(torch.float32), torch.ones_like(size))
        weight = soft if weight is None else weight * soft
    keep = valid if change.keep is None else torch.where(candidate, change.keep & valid, valid)
    separator = tokens.lookup(universe.separator) & ~candidate
    if policy == "rows" and change.keep is not None and bool(separator.any()):
        content = keep & tokens.lookup(universe.visual) & ~tokens.lookup(universe.separator)
        groups = int(universe.group.max()) + 2
        alive = torch.zeros(keep.shape[0], groups, dtype=torch.bool, device=keep.device)
        for table in (universe.group, universe.grid_group):
            ids = tokens.lookup(table)
            alive.scatter_(1, ids.masked_fill(~content | (ids < 0), groups - 1).clamp_min(0), True)
        alive[:, -1] = False
        group = tokens.lookup(universe.group).clamp_min(0)
        keep = torch.where(separator, alive.gather(1, group), keep)
    if policy == "drop" and change.keep is not None and bool(separator.any()):
        # an image that loses a token here loses its separators with it
        image = tokens.lookup(universe.image)
        slots = int(universe.image.max()) + 2
        lost = torch.zeros(keep.shape[0], slots, dtype=torch.bool, device=keep.device)
        lost.scatter_(1, image.masked_fill(~(candidate & valid & ~keep), slots - 1).clamp_min(0),
                      torch.ones_like(keep))
        lost[:, -1] = False
        keep = torch.where(separator, ~lost.gather(1, image.clamp_min(0)), keep)
    destination = tokens.rows.masked_fill(~keep, -1)  # universe row each current token ends up in
    if change.merge_into is not None:
        target = change.merge_into.clamp_min(0)
        visual = tokens.lookup(universe.visual)
        merged = candidate & ~keep & (change.merge_into >= 0) & (keep & visual).gather(1, target)
        moved = size * merged
        total = hidden.float() * size[..., None]
        total = total.scatter_add(1, target[..., None].expand_as(total), hidden.float() * moved[..., None])
        received = torch.zeros_like(size).scatter_add(1, target, moved) > 0
        size = size.scatter_add(1, target, moved)
        hidden = torch.where(received[..., None], (total / size[..., None]).to(hidden.dtype), hidden)
        destination = torch.where(merged, tokens.rows.gather(1, target), destination)
    _update_owner(prefill, destination)

    index, new_valid = keep_index(keep)
    rows = tokens.rows.gather(1, index).masked_fill(~new_valid, -1)
    hidden, size = gather_rows(hidden, index), size.gather(1, index)
    weight = None if weight is None else weight.gather(1, index)
    if change.restore is not None:
        restored = change.restore
        rows = torch.cat([rows, restored], dim=1)
        hidden = torch.cat([hidden, change.restore_hidden.to(hidden.dtype)], dim=1)
        size = torch.cat([size, torch.ones(restored.shape, dtype=size.dtype, device=size.device)], dim=1)
        if weight is not None:
            weight = torch.cat([weight, torch.ones(restored.shape, dtype=weight.dtype, device=weight.device)], dim=1)
        order = rows.argsort(dim=1, stable=True)  # padding (-1) first, then sequence order
        rows, size = rows.gather(1, order), size.gather(1, order)
        hidden = gather_rows(hidden, order)
        weight = None if weight is None else weight.gather(1, order)
        width = int((rows >= 0).sum(1).max())
        rows, hidden, size = rows[:, -width:], hidden[:, -width:], size[:, -width:]
        weight = None if weight is None else weight[:, -width:]
        columns = prefill.owner.shape[1]
        back = torch.zeros(restored.shape[0], columns + 1, dtype=torch.bool, device=restored.device)
        back.scatter_(1, restored.masked_fill(restored < 0, columns), True)
        own = torch.arange(columns, device=restored.device).expand_as(prefill.owner)
        prefill.owner = torch.where(back[:, :columns], own, prefill.owner)  # a returning token stands for itself
    positions = gather_rows(universe.positions, rows.clamp_min(0), dim=2)
    if renumber_positions:
        positions = renumber(rows >= 0)[None]
        prefill.shift = prefill.original_next - positions[0, :, -1] - 1
    prefill.tokens = TokenSet(rows, hidden, positions, size, weight, tokens.version + 1)


def _update_owner(prefill: Prefill, destination: torch.Tensor) -> None:
    """Every original token represented by a current token now belongs to that token's ``destination`` row."""
    rows = prefill.tokens.rows
    mapping = torch.full((rows.shape[0], prefill.owner.shape[1] + 1), -1, dtype=torch.long, device=rows.device)
    mapping.scatter_(1, rows.masked_fill(rows < 0, mapping.shape[1] - 1), destination)
    mapping[:, -1] = -1
    owner = prefill.owner
    prefill.owner = torch.where(owner >= 0, mapping.gather(1, owner.masked_fill(owner < 0, mapping.shape[1] - 1)), -1)

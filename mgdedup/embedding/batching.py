"""Batches of images that can be stacked: at s* > 224 images keep their aspect ratio, so one
batch holds tensors of several shapes; those of one shape run together (never padded, which
would change the GeM vector)."""

from __future__ import annotations

from collections.abc import Sequence


def shape_groups(shapes: Sequence[tuple[int, ...]], max_batch: int | None = None
                 ) -> list[list[int]]:
    """Positions of `shapes` grouped by equal shape (groups in order of first appearance,
    positions in input order), each group cut into runs of at most `max_batch`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(position)
    if max_batch is None:
        return list(groups.values())
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    return [group[start:start + max_batch] for group in groups.values()
            for start in range(0, len(group), max_batch)]


def as_list(items: list) -> list:
    """DataLoader collate function that keeps a batch as the list of its items (images of
    several shapes, or results that are not tensors)."""
    return items


def as_item(item: object) -> object:
    """DataLoader collate function for ``batch_size=None``: each item as it is."""
    return item

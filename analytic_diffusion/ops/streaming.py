"""Blocks of a memory-mapped candidate set, each within a memory budget (out-of-core retrieval, docs/design.md §5).

A retrieval over a :class:`KeyBank` whose rows live in a mapped file (``keys.pages``) runs block by block and
combines the blocks' partial states in order, as it combines shards. Before a block is computed the OS is asked
to read the next one (readahead overlaps the read with the compute); after it, the block's pages are handed back,
so the resident memory stays O(budget) whatever N.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .keys import KeyBank


def block_rows(keys: KeyBank, memory_budget: int) -> int:
    """Rows per block: the mapped rows take half the budget (the backend's temporaries the other half)."""
    return max(1, (int(memory_budget) // 2) // max(1, keys.dim * keys.values.element_size()))


def blocks(keys: KeyBank, memory_budget: int) -> Iterator[tuple[int, KeyBank]]:
    """(first row, a bank over rows first:first+r) in order; the same centre as the whole set throughout."""
    pages = keys.pages
    center = keys.get_center(torch.float64)
    step = block_rows(keys, memory_budget)
    for s in range(0, keys.n, step):
        e = min(keys.n, s + step)
        if pages is not None and e < keys.n:
            pages.prefetch(e, min(keys.n, e + step))
        yield (
            s,
            KeyBank(
                keys.values[s:e],
                keys.scale,
                keys.shift,
                None if keys.labels is None else keys.labels[s:e],
                keys.image_shape,
                center,
            ),
        )
        if pages is not None:
            pages.release(s, e)

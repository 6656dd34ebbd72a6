"""Tests that compressor's cached lookups of fla's functions and kernels find nothing in an fla of another shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def looked_up_afresh(lookup: Callable, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside, ``lookup`` (an ``lru_cache``d function) looks again, so that it sees what the block patches through
    ``monkeypatch``; after the block, the patches are undone and ``lookup`` finds what it found before."""
    before = lookup()
    lookup.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        lookup.cache_clear()
    assert lookup() == before

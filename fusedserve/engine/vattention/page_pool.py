"""The free list of physical pages, kept as sorted runs so that a slot's pages tend to be consecutive.

Pages are numbered 0..N-1 in creation order; on the CPU backend page i+1 sits right after page i in the memfd,
so a slot whose page k+1 is the pool page after its page k occupies one kernel VMA instead of two (the kernel
caps VMAs near 65k per process). The policy: extend the caller's previous page when its successor is free;
otherwise start in the middle of the largest free run, leaving room on both sides for neighbours that are
still growing. This module only does bookkeeping: it never maps memory and never decides who may take pages
(the allocator does).
"""

from __future__ import annotations

import bisect


class PagePool:
    """Free page numbers as disjoint runs [start, end), sorted by start."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._starts: list[int] = [0] if num_pages else []
        self._ends: dict[int, int] = {0: num_pages} if num_pages else {}
        self._num_free = num_pages

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_runs(self) -> int:
        return len(self._starts)

    def is_free(self, page: int) -> bool:
        index = bisect.bisect_right(self._starts, page) - 1
        return index >= 0 and page < self._ends[self._starts[index]]

    def take(self, after: int | None = None) -> int:
        """A free page: `after + 1` if that one is free, else the middle of the largest free run."""
        if not self._num_free:
            raise LookupError("page pool is empty")
        if after is not None and after + 1 < self.num_pages and self.is_free(after + 1):
            page = after + 1
        else:
            start = max(self._starts, key=lambda s: self._ends[s] - s)
            length = self._ends[start] - start
            page = start if start == 0 else start + length // 2
        self._remove(page)
        return page

    def give_back(self, page: int) -> None:
        if not 0 <= page < self.num_pages or self.is_free(page):
            raise ValueError(f"page {page} is not a taken page of this pool")
        index = bisect.bisect_left(self._starts, page)
        start, end = page, page + 1
        if index < len(self._starts) and self._starts[index] == end:  # merge with the run after
            end = self._ends.pop(self._starts.pop(index))
        if index > 0 and self._ends[self._starts[index - 1]] == page:  # merge with the run before
            start = self._starts[index - 1]
            self._ends[start] = end
        else:
            self._starts.insert(index, start)
            self._ends[start] = end
        self._num_free += 1

    def _remove(self, page: int) -> None:
        index = bisect.bisect_right(self._starts, page) - 1
        start = self._starts[index]
        end = self._ends.pop(start)
        self._starts.pop(index)
        if page + 1 < end:
            self._starts.insert(index, page + 1)
            self._ends[page + 1] = end
        if start < page:
            self._starts.insert(index, start)
            self._ends[start] = page
        self._num_free -= 1

"""The free list of physical pages, kept as sorted runs so that a slot's pages tend to be consecutive.

Pages are numbered 0..N-1 in creation order; on the CPU backend page i+1 sits right after page i in the memfd,
so a slot whose page k+1 is the pool page after its page k occupies one kernel VMA instead of two (the kernel
caps VMAs near 65k per process), and a run of consecutive pages maps with one call (one mmap per region).
The policy: extend the caller's previous page when its successor is free; otherwise start in the middle of the
largest free run, leaving room on both sides for neighbours that are still growing, but shifted left when the
pages asked for at once would not fit after the middle. Returned pages rejoin their neighbours, so the free list
stays sorted and coalesced. This module only does bookkeeping: it never maps memory and never decides who may
take pages (the allocator does).
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

    @property
    def largest_run(self) -> int:
        return max((self._ends[start] - start for start in self._starts), default=0)

    def is_free(self, page: int) -> bool:
        index = bisect.bisect_right(self._starts, page) - 1
        return index >= 0 and page < self._ends[self._starts[index]]

    def take(self, after: int | None = None) -> int:
        """A free page: `after + 1` if that one is free, else the middle of the largest free run."""
        return self.take_pages(1, after)[0]

    def take_pages(self, count: int, after: int | None = None) -> list[int]:
        """`count` free pages in mapping order, in as few runs of consecutive pages as the free runs allow.

        First the run continuing `after` (as far as it is free), then, while pages are missing, a run placed in
        the largest free run: from its middle (its start when it starts the pool), shifted left so that the
        missing pages fit whole when the run is big enough, else all of it.
        """
        if count > self._num_free:
            raise LookupError(f"page pool holds {self._num_free} free pages, not {count}")
        taken: list[int] = []
        previous = after
        while len(taken) < count:
            wanted = count - len(taken)
            if previous is not None and previous + 1 < self.num_pages and self.is_free(previous + 1):
                first = previous + 1
                end = self._ends[self._starts[bisect.bisect_right(self._starts, first) - 1]]
            else:
                start = max(self._starts, key=lambda s: self._ends[s] - s)
                end = self._ends[start]
                first = start if start == 0 else start + (end - start) // 2
                first = max(start, min(first, end - wanted))
            stop = min(end, first + wanted)
            self._remove(first, stop)
            taken.extend(range(first, stop))
            previous = stop - 1
        return taken

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

    def _remove(self, first: int, stop: int) -> None:
        """Take [first, stop) out of the free run holding it (the caller found it free)."""
        index = bisect.bisect_right(self._starts, first) - 1
        start = self._starts[index]
        end = self._ends.pop(start)
        if stop > end:
            raise ValueError(f"pages [{first}, {stop}) are not one free run")
        self._starts.pop(index)
        if stop < end:
            self._starts.insert(index, stop)
            self._ends[stop] = end
        if start < first:
            self._starts.insert(index, start)
            self._ends[start] = first
        self._num_free -= stop - first

"""Page allocation with automatic prefix caching. Plain Python: no JAX, unit-testable alone.

Page 0 is never handed out (padded tokens write there). A full page is keyed by a hash of its whole
token prefix; freed pages keep their key and go to the back of an LRU free list, so a later request with
the same prefix revives them instead of recomputing. Pages are evicted (key dropped) only when the free
list's front is taken for new data.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


def page_hashes(token_ids: list[int], page_size: int, num_pages: int | None = None,
                salt: str | None = None) -> list[int]:
    """Chained hashes of the first `num_pages` full pages: each covers the whole prefix up to it. A salt
    (vLLM's cache_salt) starts the chain, so that only requests with the same salt share pages."""
    full = len(token_ids) // page_size if num_pages is None else num_pages
    hashes, parent = [], (None if salt is None else hash(("cache_salt", salt)))
    for i in range(full):
        parent = hash((parent, tuple(token_ids[i * page_size:(i + 1) * page_size])))
        hashes.append(parent)
    return hashes


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found cached

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (page 0 is scratch)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.free_pages: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self.hash_of_page: dict[int, int] = {}
        self.page_of_hash: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by running sequences."""
        return 1.0 - self.num_free_pages / (self.num_pages - 1)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def lookup_prefix(self, token_ids: list[int], use_cache: bool = True,
                      salt: str | None = None) -> tuple[list[int], list[int]]:
        """Cached pages for the longest cached prefix, taken (ref-counted) by the caller.

        The last prompt token is always recomputed (its logits are needed), so at most
        (len - 1) // page_size pages can hit. Returns (pages, hashes of all full prompt pages).
        """
        hashes = page_hashes(token_ids, self.page_size, salt=salt)
        if not (self.enable_prefix_caching and use_cache):
            return [], hashes
        pages = []
        for h in hashes[: (len(token_ids) - 1) // self.page_size]:
            page = self.page_of_hash.get(h)
            if page is None:
                break
            pages.append(page)
        self.stats.queries += len(token_ids)
        self.stats.hits += len(pages) * self.page_size
        for page in pages:
            self._take(page)
        return pages, hashes

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh pages, or None (nothing taken) when too few are free."""
        if count > len(self.free_pages):
            return None
        pages = []
        for _ in range(count):
            page, _ = self.free_pages.popitem(last=False)  # least recently freed first
            old = self.hash_of_page.pop(page, None)
            if old is not None and self.page_of_hash.get(old) == page:
                del self.page_of_hash[old]
            self.ref_counts[page] = 1
            pages.append(page)
        # In ascending order: `free` hands a sequence's pages back tail first, and the attention kernel reads a
        # sequence's rows ~15% slower when its pages run backwards through memory (docs/benchmarks.md, round 11).
        return sorted(pages)

    def register_full_page(self, page: int, page_hash: int) -> None:
        """Make a page that now holds a full, computed page of tokens findable by later requests."""
        if not self.enable_prefix_caching or page in self.hash_of_page:
            return
        if page_hash not in self.page_of_hash:
            self.page_of_hash[page_hash] = page
        self.hash_of_page[page] = page_hash

    def free(self, pages: list[int]) -> None:
        # Reverse order: a sequence's tail pages are evicted before its shared prefix pages.
        for page in reversed(pages):
            self.ref_counts[page] -= 1
            if self.ref_counts[page] == 0:
                self.free_pages[page] = None

    def _take(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self.free_pages[page]
        self.ref_counts[page] += 1

    def reset_prefix_cache(self) -> None:
        self.hash_of_page.clear()
        self.page_of_hash.clear()

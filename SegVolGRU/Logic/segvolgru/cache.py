"""Content keys of volumes and the bounded LRU cache of image embeddings.

The encoder does not depend on prompts, so its outputs are cached per (volume content, crop, window). The content
key hashes every byte of the volume (with its shape and dtype), so a single changed voxel gives a new key and can
never hit a stale entry.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_CHUNK = 1 << 24
DEFAULT_CACHE_BYTES = 2 * 1024 ** 3


def content_key(volume: np.ndarray) -> str:
    """BLAKE2b over shape, dtype and bytes; chunks hash on two threads (hashlib releases the GIL)."""
    data = np.ascontiguousarray(volume)
    flat = data.reshape(-1).view(np.uint8)
    head = f"{data.shape}|{data.dtype.str}|".encode()
    chunks = [flat[i:i + _CHUNK] for i in range(0, flat.size, _CHUNK)] or [flat]
    if len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=2) as pool:
            digests = list(pool.map(lambda c: hashlib.blake2b(c, digest_size=16).digest(), chunks))
    else:
        digests = [hashlib.blake2b(chunks[0], digest_size=16).digest()]
    return hashlib.blake2b(head + b"".join(digests), digest_size=20).hexdigest()


def value_nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(value_nbytes(v) for v in value)
    return 64


class EmbeddingCache:
    """Thread-safe LRU of tensors bounded by their total size in bytes (default 2 GiB).

    One official-size window embedding (1, 768, 8, 16, 16) float32 is 6.3 MB (15 s of encoder on 2 CPU cores);
    the factored decoder's products of it are 37.8 MB more but take only ~0.3 s to recompute. Entries put with
    ``cheap=True`` (those products) are evicted first, least recently used first, so the default keeps ~340 window
    embeddings, and the products of as many windows as fit beside them.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._cheap: OrderedDict[Hashable, None] = OrderedDict()  # keys of cheap entries, in LRU order
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            if key in self._cheap:
                self._cheap.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: object, cheap: bool = False) -> None:
        """Store ``value``; ``cheap``: quick to recompute, so evicted before any other entry."""
        size = value_nbytes(value)
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self._bytes += size
            if cheap:
                self._cheap[key] = None
            while self._bytes > self.max_bytes:
                self._pop(next(iter(self._cheap)) if self._cheap else next(iter(self._items)))

    def _pop(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
            self._cheap.pop(key, None)

    def get_or_compute(self, key: Hashable, compute: Callable[[], object], cheap: bool = False) -> object:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value, cheap)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._cheap.clear()
            self._bytes = 0


_shared: EmbeddingCache | None = None


def shared_cache() -> EmbeddingCache:
    """The process-wide cache that sessions and :func:`segvolgru.segment` use unless given their own."""
    global _shared
    if _shared is None:
        _shared = EmbeddingCache()
    return _shared

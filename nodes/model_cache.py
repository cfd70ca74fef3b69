"""Loaded weights kept between prompts, one entry per slot, keyed by (file, options).

ComfyUI reuses a node's output only while its inputs stay the same; our loads outlive that, so a
widget changed and changed back, a second loader node pointing at the same file, or a re-run
after an unrelated edit does not read 28 GB again. One entry per slot ("high", "low",
"text_encoder", "vae") bounds the memory: loading a different file into a slot first drops the
old one, and changing one expert's file reloads only that expert.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


class LoadCache:
    def __init__(self):
        self._entries: dict[str, tuple[Hashable, Any]] = {}
        self.loads = 0  # how many times a loader actually ran (tests read it)

    def get(self, slot: str, key: Hashable, load: Callable[[], Any]) -> Any:
        entry = self._entries.get(slot)
        if entry is not None and entry[0] == key:
            return entry[1]
        self._entries.pop(slot, None)  # free the old weights before reading the new ones
        value = load()
        self.loads += 1
        self._entries[slot] = (key, value)
        return value

    def drop(self, slot: str) -> None:
        """Forget a slot: its memory is needed elsewhere, or its value can no longer be trusted."""
        self._entries.pop(slot, None)

    def clear(self) -> None:
        self._entries.clear()


CACHE = LoadCache()

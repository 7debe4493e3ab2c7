"""A prompt cache on disk: the state files of prompt prefixes worth keeping, shared by processes.

``load(path, prompt_cache=DIR, prompt_cache_bytes=N)`` makes every generation call of the model
(and of its sessions) look here before it prefills, and save what is worth keeping:

- the first turn of a chat (the system or developer turn with the tool declarations: the prefix
  up to the second ``<start_of_turn>``), and
- a long prompt (at least ``LONG_PROMPT`` tokens): up to its last ``<start_of_turn>``, so that
  the conversation it begins finds it again; without turns, the whole prompt;

each when it adds at least ``MIN_TOKENS`` tokens to what the model holds or restored. A call
restores the longest saved prefix of its prompt — at a turn boundary, or the whole prompt —
unless the model already holds more of it. Entries are named by a digest of the model's
fingerprint and the prefix's token ids, so models never share entries; files are written
atomically (``Model.save_state``), and the least recently used go first when the directory holds
more than ``prompt_cache_bytes``. A damaged entry is dropped with a warning and the prompt
computed again: the call gives the same output.

A prefix is saved before the call that meets it (prefilled by ``save_state``, which the call then
reuses), so that call's ``Completion.prefill_seconds`` leaves out that prefix's prefill and its
``reused_tokens`` counts it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Model

#: Prefixes shorter than this are not worth a file.
MIN_TOKENS = 256
#: Prompts at least this long are saved even without a chat's first turn.
LONG_PROMPT = 1024
SUFFIX = ".state"


class PromptCache:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"prompt_cache_bytes must be an int, got {type(max_bytes).__name__}")
        if max_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be at least 0, got {max_bytes}")
        self.dir = Path(os.fspath(directory))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        #: The model's (set once it is loaded): entries of other models never match.
        self.fingerprint = ""

    def entry(self, ids: Sequence[int]) -> Path:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
        return self.dir / (h.hexdigest()[:40] + SUFFIX)

    @staticmethod
    def boundaries(ids: Sequence[int], turn: int | None) -> list[int]:
        """Lengths of the prefixes that end where a turn starts, after the first turn (the
        prefix up to the first ``<start_of_turn>`` is only BOS)."""
        if turn is None:
            return []
        return [i for i in range(len(ids)) if ids[i] == turn][1:]

    def prepare(self, model: Model, ids: list[int], turn: int | None) -> None:
        """Brings `model` to the longest cached prefix of `ids` and saves the prefixes worth
        keeping that are missing (prefilling them as the call would)."""
        bounds = self.boundaries(ids, turn)
        held = model._inner.held_prefix(ids)
        lookups = sorted({*bounds, len(ids)}, reverse=True)
        for k in lookups:
            if k < MIN_TOKENS or k <= held:
                break
            path = self.entry(ids[:k])
            if not path.exists():
                continue
            try:
                model._inner.load_state(os.fspath(path))
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            except Exception as e:  # noqa: BLE001 - GemmaError or OSError: drop it, recompute
                warnings.warn(f"prompt cache: dropped {path.name}: {e}", stacklevel=4)
                path.unlink(missing_ok=True)
                continue
            try:
                os.utime(path)  # recently used
            except OSError:
                pass
            held = k
            break
        keep: list[int] = []
        if bounds:
            keep.append(bounds[0])
        if len(ids) >= LONG_PROMPT:
            keep.append(bounds[-1] if bounds else len(ids))
        wrote = False
        for k in sorted(set(keep)):
            # Worth a file only when it adds MIN_TOKENS to what the model already holds (a
            # chat's later turns are not saved one by one).
            if k - held < MIN_TOKENS:
                continue
            path = self.entry(ids[:k])
            if path.exists():
                continue
            try:
                model._inner.save_state(os.fspath(path), ids[:k])
                wrote = True
                held = k
            except OSError as e:
                warnings.warn(f"prompt cache: could not write {path}: {e}", stacklevel=4)
        if wrote:
            self.evict()

    def evict(self) -> None:
        """Removes the least recently used entries beyond `max_bytes`."""
        entries = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size

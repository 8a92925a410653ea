"""Generated tokens -> text, as it streams: incremental detokenization that never emits half a character, and
stop sequences that hold back text that might be the start of one."""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class Detokenizer:
    """Turns token ids into text deltas. Each delta is decoded with a few tokens of context before it, because
    tokenizers decode a token differently at the start of a string (a leading space, a partial byte sequence)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # context tokens start here
        self._read_offset = 0  # text up to here has been emitted

    def push(self, token_id: int) -> str:
        """The new text `token_id` completes ("" while it ends inside a multi-byte character)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return after[len(before):]


class StopMatcher:
    """Finds the first stop sequence in streamed text. Text that could still turn into a stop sequence is held
    back, so no part of a stop sequence is ever emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop sequence found or None). After a stop, nothing more should be fed."""
        self._held += text
        found = [(self._held.find(s), s) for s in self.stops if s in self._held]
        if found:
            position, stop = min(found)
            emitted, self._held = self._held[:position], ""
            return emitted, stop
        keep = self._longest_partial_stop()
        emitted, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return emitted, None

    def flush(self) -> str:
        emitted, self._held = self._held, ""
        return emitted

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of some stop sequence."""
        for length in range(min(len(self._held), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            suffix = self._held[-length:]
            if any(s.startswith(suffix) for s in self.stops):
                return length
        return 0

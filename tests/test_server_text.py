"""Streaming text: incremental detokenization and stop sequences (kvmart/server/pipeline/text.py)."""

from __future__ import annotations

import pytest

from kvmart.server.pipeline.text import REPLACEMENT, Detokenizer, StopMatcher

TEXT = "Licensed under the Apache License — «Version 2.0», see 世界 🎉 for détails.\n\nEnd."


def test_deltas_add_up_to_the_decoded_text_and_never_split_a_character(model_f32):
    ids = model_f32.tokenize(TEXT)
    detokenizer = Detokenizer(model_f32.decode)
    deltas = [detokenizer.push(t) for t in ids] + [detokenizer.flush()]
    assert "".join(deltas) == model_f32.decode(ids) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    assert len([d for d in deltas if d]) > 10  # it streams, it does not emit everything at the end


def test_incomplete_character_at_the_end_is_flushed_as_replacement(model_f32):
    ids = model_f32.tokenize("🎉")
    assert len(ids) > 1, "the test needs a character split over several tokens"
    detokenizer = Detokenizer(model_f32.decode)
    assert [detokenizer.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.flush() == model_f32.decode(ids[:-1])


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for piece in pieces:
        emitted, stop = matcher.feed(piece)
        out += emitted
        if stop is not None:
            return out, stop
    return out + matcher.flush(), None


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. STOP here"], ["Hello world. S", "T", "OP here"],
                                    ["Hello world. STOP", " here"]])
def test_stop_sequence_split_across_deltas(pieces):
    assert feed_all(StopMatcher(("STOP",)), pieces) == ("Hello world. ", "STOP")


def test_earliest_stop_wins_and_held_text_is_released_when_it_cannot_stop():
    assert feed_all(StopMatcher(("world", "lo")), ["Hello world"]) == ("Hel", "lo")
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc ST") == ("abc ", None)  # "ST" might begin "STOP": held back
    assert matcher.feed("ART") == ("START", None)
    assert feed_all(StopMatcher(("STOP",)), ["no stop at all, ST"]) == ("no stop at all, ST", None)


def test_no_stop_sequences_emits_everything():
    assert StopMatcher(()).feed("anything") == ("anything", None)
    assert StopMatcher(("",)).feed("empty stops are ignored") == ("empty stops are ignored", None)

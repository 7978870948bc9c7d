"""Stop strings, pure text: the first stop string ends the text, and nothing that may begin one is let through
early, whatever the deltas' boundaries (checked against the plain definition on random cuts)."""
from __future__ import annotations

import random

import pytest

from ember.runtime.serve.stop_strings import StopStringMatcher


def feed(stops, deltas) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out = [matcher.push(d) for d in deltas]
    if not matcher.stopped:
        out.append(matcher.flush())
    return out, matcher.stopped


def expected(stops, text) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def test_a_stop_string_spanning_deltas_is_held_back_then_dropped():
    out, stopped = feed(["END"], ["hello E", "N", "D and more"])
    assert out == ["hello ", "", ""] and stopped


def test_held_back_text_is_released_when_it_can_no_longer_match():
    out, stopped = feed(["END"], ["a E", "Nx", " b"])
    assert out == ["a ", "ENx", " b", ""] and not stopped


def test_the_earliest_of_several_stop_strings_wins():
    out, stopped = feed(["world", "lo w"], ["hello world"])
    assert "".join(out) == "hel" and stopped


def test_no_stop_strings_pass_everything_through():
    assert feed([], ["a", "b"]) == (["a", "b", ""], False)


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopStringMatcher([""])


@pytest.mark.parametrize("seed", range(200))
def test_any_cut_of_the_text_gives_the_plain_definition(seed):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    # pieces once let through are never taken back, so equal totals mean nothing of a stop string leaked early
    out, stopped = feed(stops, deltas)
    assert ("".join(out), stopped) == expected(stops, text)

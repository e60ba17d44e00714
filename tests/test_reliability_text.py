"""Reliability round 2 (issue 19): answers are whole characters in every Unicode normal form.

BERT's uncased normalizer drops accents, so on NFD text ("Jose" + U+0301) the tokenizer's offsets
stop before the combining mark and the answer was "Jose" instead of "José". Answers now end (and
start) on whole user-perceived characters: combining marks, Indic vowel signs and viramas,
zero-width joiners, emoji modifiers and conjoining Hangul jamo stay with their base character.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import lookup_bundle, token_ids

from engine import Engine
from engine.postprocess import joins_previous, whole_characters

FORMS = ("NFC", "NFD", "NFKD")
# (word as written, the tokens that start and end it under the bundles' uncased tokenizer)
WORDS = {
    "accented-end": "José",  # the mark is the last character in NFD: it was cut off
    "accented-all": "Ünïcödé",
    "hindi-anusvara": "में",  # म + vowel sign E (Mn) + anusvara (Mn): both dropped by the normalizer
    "hindi": "हिन्दी",
    "hangul": "한국",
}


def _planted_tables() -> dict[str, dict[int, float]]:
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for word in WORDS.values():
        for form in FORMS:
            ids = token_ids(unicodedata.normalize(form, word))
            start[ids[0]] = 12.0
            end[ids[-1]] = 12.0
    return {"start": start, "end": end}


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = lookup_bundle(tmp_path_factory.mktemp("unicode"), **_planted_tables(), max_seq_len=64)
    with Engine(root, backend="onnxruntime", threads=1) as e:
        yield e


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(WORDS))
@pytest.mark.parametrize("align_to_words", [True, False])
def test_answers_keep_their_combining_marks_in_every_normal_form(eng: Engine, name: str, form: str, align_to_words: bool) -> None:
    word = unicodedata.normalize(form, WORDS[name])
    context = unicodedata.normalize(form, "The old map said only this: ") + word + ", and nothing more."
    a = eng.answer("What did the map say?", context, align_to_words=align_to_words, max_answer_len=8)
    assert a.text == word, (name, form, a.text, word)
    assert context[a.start:a.end] == a.text
    assert a.end == len(context) or not joins_previous(context[a.end - 1], context[a.end])


@pytest.mark.parametrize(("text", "span", "want"), [
    ("Jose\u0301 x", (0, 4), (0, 5)),  # NFD accent after the end
    ("e\u0301\u0323 x", (0, 1), (0, 3)),  # two marks
    ("ne\u0301e", (2, 4), (1, 4)),  # a start on a mark moves back to its base
    ("A\u200dB", (0, 1), (0, 2)),  # ZWJ stays with what precedes it
    ("\U0001F44D\U0001F3FD ok", (0, 1), (0, 2)),  # thumbs up + skin tone
    ("\U0001F468\u200d\U0001F469 x", (0, 1), (0, 3)),  # man ZWJ woman: one emoji
    ("\u1112\u1161\u11ab\u1100", (0, 1), (0, 3)),  # NFD Hangul: L V T, then a new syllable (L)
    ("\uD55C\u11ab", (0, 1), (0, 2)),  # an LV syllable followed by a T jamo
    ("\uD55C\uAD6D", (0, 1), (0, 1)),  # two NFC syllables: separate characters
    ("ab cd", (0, 2), (0, 2)),  # ASCII: untouched
])
def test_whole_characters(text: str, span: tuple[int, int], want: tuple[int, int]) -> None:
    assert whole_characters(text, *span) == want


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20), st.data())
def test_whole_characters_only_widens_and_ends_on_a_boundary(text: str, data: st.DataObject) -> None:
    a = data.draw(st.integers(0, len(text) - 1))
    z = data.draw(st.integers(a + 1, len(text)))
    a2, z2 = whole_characters(text, a, z)
    assert 0 <= a2 <= a < z <= z2 <= len(text)
    assert z2 == len(text) or not joins_previous(text[z2 - 1], text[z2])
    assert a2 == 0 or not joins_previous(text[a2 - 1], text[a2])

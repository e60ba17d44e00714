"""The SQuAD scorer against hand-made cases of the official v1.1 / v2.0 rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import squad_eval
from bench.squad_eval import exact_match_v1, f1_v1, normalize_answer, score

DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "squad"


def _dataset(qas: list[dict], *, version: str = "1.1") -> dict:
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),  # case and leading article
        ("a cat, an owl and the dog.", "cat owl and dog"),  # articles anywhere, punctuation
        ("  Denver   Broncos\n\t", "denver broncos"),  # whitespace collapsed and stripped
        ("Theatre", "theatre"),  # 'the' inside a word is not an article
        ("U.S.-based", "usbased"),  # punctuation removed, not replaced by a space
        ("“quoted”", "“quoted”"),  # only ASCII punctuation is removed, as in the official script
        ("A", ""),
    ],
)
def test_normalize_answer_follows_the_official_rules(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized
    assert normalize_answer(raw, v2=True) == normalized


def test_exact_match_and_f1_v1() -> None:
    assert exact_match_v1("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match_v1("Denver", "Denver Broncos") == 0.0
    # pred tokens {denver}, gold {denver, broncos}: precision 1, recall 1/2
    assert f1_v1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: common = min counts
    assert f1_v1("go go go", "go") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1_v1("cat", "dog") == 0.0
    # a prediction that normalises to nothing has F1 0 against a non-empty gold (v1.1)
    assert f1_v1("the", "dog") == 0.0


def test_v1_takes_the_max_over_gold_answers_and_counts_missing_as_zero() -> None:
    ds = _dataset(
        [
            {"id": "q1", "question": "?", "answers": [{"text": "Denver Broncos", "answer_start": 0}, {"text": "Broncos", "answer_start": 7}]},
            {"id": "q2", "question": "?", "answers": [{"text": "Santa Clara", "answer_start": 0}]},
            {"id": "q3", "question": "?", "answers": [{"text": "1966", "answer_start": 0}]},
        ]
    )
    out = score(ds, {"q1": "broncos", "q2": "Santa Clara, California"})  # q3 unanswered
    assert out["version"] == "1.1"
    assert out["total"] == 3
    assert out["exact_match"] == pytest.approx(100 * 1 / 3)
    # q1: 1.0 (second gold), q2: P=2/3 R=1 -> 0.8, q3: 0
    assert out["f1"] == pytest.approx(100 * (1.0 + 0.8) / 3)


def test_v2_empty_answer_rules_and_splits() -> None:
    ds = _dataset(
        [
            {"id": "h1", "question": "?", "answers": [{"text": "Normandy", "answer_start": 0}], "is_impossible": False},
            {"id": "h2", "question": "?", "answers": [{"text": "10th century", "answer_start": 0}], "is_impossible": False},
            {"id": "n1", "question": "?", "answers": [], "is_impossible": True},
            {"id": "n2", "question": "?", "answers": [], "is_impossible": True},
            # a gold answer that normalises to nothing counts as "no answer"
            {"id": "n3", "question": "?", "answers": [{"text": "the", "answer_start": 0}], "is_impossible": False},
        ],
        version="v2.0",
    )
    preds = {"h1": "normandy", "h2": "", "n1": "", "n2": "France", "n3": ""}
    out = score(ds, preds)
    assert out["version"] == "2.0"
    assert out["total"] == 5
    # exact: h1 1, h2 0 (empty vs gold), n1 1 (both empty), n2 0 (answer to impossible), n3 1
    assert out["exact_match"] == pytest.approx(100 * 3 / 5)
    assert out["f1"] == pytest.approx(100 * 3 / 5)
    # n3 has an answers list, so it is a HasAns question in the splits (official qid_to_has_ans)
    assert out["HasAns_total"] == 3
    assert out["HasAns_exact_match"] == pytest.approx(100 * 2 / 3)
    assert out["NoAns_total"] == 2
    assert out["NoAns_exact_match"] == pytest.approx(50.0)


def test_v2_totals_are_over_predicted_questions_like_the_official_script() -> None:
    ds = _dataset(
        [
            {"id": "h1", "question": "?", "answers": [{"text": "Normandy", "answer_start": 0}]},
            {"id": "n1", "question": "?", "answers": [], "is_impossible": True},
        ],
        version="v2.0",
    )
    out = score(ds, {"h1": "Normandy"})
    assert out["total"] == 1 and out["exact_match"] == 100.0
    assert "NoAns_total" not in out


def test_version_is_detected_from_is_impossible_without_a_version_field() -> None:
    ds = _dataset([{"id": "n1", "question": "?", "answers": [], "is_impossible": True}], version="")
    assert squad_eval.is_v2(ds)
    assert score(ds, {"n1": ""})["exact_match"] == 100.0


@pytest.mark.parametrize("name", ["dev-v1.1.json.gz", "dev-v2.0.json.gz"])
def test_gold_answers_score_100_on_the_shipped_dev_sets(name: str) -> None:
    from export.squad_data import load_squad, read_squad_json

    ds = read_squad_json(DATA / name)
    preds = {e.qid: (e.answers[0] if e.answers and not e.is_impossible else "") for e in load_squad(DATA / name)}
    out = score(ds, preds)
    assert out["exact_match"] == 100.0 and out["f1"] == 100.0
    assert out["total"] == (10570 if "v1.1" in name else 11873)


def test_score_command_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(_dataset([{"id": "q1", "question": "?", "answers": [{"text": "Denver Broncos", "answer_start": 0}]}])))
    preds = tmp_path / "pred.json"
    preds.write_text(json.dumps({"q1": "Denver"}))
    assert squad_eval.main(["--data", str(data), "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exact_match"] == 0.0 and out["f1"] == pytest.approx(100 * 2 / 3)

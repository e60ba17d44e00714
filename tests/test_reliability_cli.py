"""Reliability round 2 (issue 19): the command lines answer every user mistake with one line and a
non-zero exit, never a traceback (`python -m export`, `python -m bench score`)."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.default_model import CHECKPOINT_DIR

REPO = Path(__file__).resolve().parents[1]
SQUAD = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Ada wrote it.", "qas": [
    {"id": "q1", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0}]},
    {"id": "q2", "question": "What?", "answers": [{"text": "it", "answer_start": 10}]}]}]}]}


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- python -m bench score ------------------------------------------------------------------------------
def _score(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Any, predictions: Any, *,
           raw_predictions: bytes | None = None, raw_data: bytes | None = None) -> tuple[int, str, str]:
    from bench.squad_eval import main

    d, p = tmp_path / "data.json", tmp_path / "pred.json"
    d.write_bytes(raw_data if raw_data is not None else json.dumps(data).encode())
    p.write_bytes(raw_predictions if raw_predictions is not None else json.dumps(predictions).encode())
    rc = main(["--data", str(d), "--predictions", str(p)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("raw", "needle"), [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON (empty file)"),
    (json.dumps({"q1": "Ada"}).encode("utf-16"), "not UTF-8 text"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"q1": ' + b"9" * 5000 + b"}", "cannot be read"),
    (b'["Ada"]', "expected a JSON object"),
    (b'{"q1": 3}', "the prediction for 'q1' is int 3, not a string"),
    (b'{"q1": ["Ada"]}', "is list"),
    (b'{"q1": null}', "is NoneType"),
    (b'{}', "holds no predictions"),
    (b'{"zz": "Ada", "yy": "it"}', "none of the 2 prediction ids is in"),
])
def test_bad_predictions_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes, needle: str) -> None:
    rc, out, err = _score(tmp_path, capsys, SQUAD, None, raw_predictions=raw)
    assert rc == 1 and out == ""
    _one_line_error(err, needle)


@pytest.mark.parametrize(("data", "needle"), [
    ({"nothing": 1}, 'an object with a "data" list'),
    ([1, 2], 'an object with a "data" list'),
    ({"data": [{"title": "x"}]}, 'data[0] should be an article with a "paragraphs" list'),
    ({"data": [{"paragraphs": [{"qas": [{"question": "?"}]}]}]}, 'data[0].paragraphs[0].qas[0] should be a question'),
    ({"data": [{"paragraphs": [{"qas": [{"id": "q1", "answers": ["Ada"]}]}]}]}, "answers should be a list of"),
    ({"data": []}, "has no questions"),
])
def test_data_that_is_not_squad_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Any, needle: str) -> None:
    rc, out, err = _score(tmp_path, capsys, data, {"q1": "Ada"})
    assert rc == 1
    _one_line_error(err, "not a SQuAD file" if "no questions" not in needle else "", needle)


def test_a_folder_or_a_missing_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.squad_eval import main

    (tmp_path / "p.json").write_text('{"q1": "Ada"}')
    assert main(["--data", str(tmp_path), "--predictions", str(tmp_path / "p.json")]) == 1
    _one_line_error(capsys.readouterr().err, "is a folder")
    assert main(["--data", str(tmp_path / "nope.json"), "--predictions", str(tmp_path / "p.json")]) == 1
    _one_line_error(capsys.readouterr().err, "no such file")
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip at all")
    assert main(["--data", str(tmp_path / "bad.json.gz"), "--predictions", str(tmp_path / "p.json")]) == 1
    _one_line_error(capsys.readouterr().err, "cannot be read")


def test_unknown_ids_are_warned_about_and_the_rest_scored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _score(tmp_path, capsys, SQUAD, {"q1": "Ada", "other": "x"})
    assert rc == 0
    assert err.strip() == ("warning: 1 of 2 prediction ids are not in " + str(tmp_path / "data.json") +
                           " (e.g. 'other'); they are not scored")
    result = json.loads(out)
    assert result["total"] == 2 and result["exact_match"] == 50.0


def test_gzipped_data_still_scores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.squad_eval import main

    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump(SQUAD, f)
    (tmp_path / "p.json").write_text('{"q1": "Ada", "q2": "it"}')
    assert main(["--data", str(tmp_path / "d.json.gz"), "--predictions", str(tmp_path / "p.json")]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 100.0


def test_bench_score_command_line_prints_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps(SQUAD))
    (tmp_path / "p.json").write_bytes(b"\xff\xfe{\x00}\x00")
    proc = subprocess.run([sys.executable, "-m", "bench", "score", "--data", str(tmp_path / "d.json"), "--predictions",
                           str(tmp_path / "p.json")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    _one_line_error(proc.stderr, "not UTF-8")


# ---- python -m export ------------------------------------------------------------------------------------
def _export(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from export.__main__ import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def _checkpoint(tmp_path: Path, config: Any = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    if config is None:
        shutil.copyfile(CHECKPOINT_DIR / "config.json", d / "config.json")
    else:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def _config(**changes: Any) -> dict[str, Any]:
    cfg = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize(("config", "needle"), [
    ([1, 2, 3], "a model config is a JSON object, this one is a list"),
    ("{broken", "unreadable"),
    ('{"a": ' + "[" * 100_000, "unreadable"),
    (_config(hidden_size=None), "lacks the model sizes hidden_size"),
    (_config(vocab_size="30522", max_position_embeddings=None), "vocab_size, max_position_embeddings"),
    (_config(num_attention_heads=True), "num_attention_heads"),
    (_config(model_type=["bert"]), "is not supported"),
    (_config(architectures="BertForQuestionAnswering"), "'architectures' should be a list"),
])
def test_a_bad_config_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], config: Any, needle: str) -> None:
    rc, err = _export([str(_checkpoint(tmp_path, config)), "--out", str(tmp_path / "out")], capsys)
    assert rc == 1
    _one_line_error(err, needle)


def test_an_out_folder_that_cannot_be_written_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _checkpoint(tmp_path)
    (tmp_path / "a-file").write_text("x")
    rc, err = _export([str(ckpt), "--out", str(tmp_path / "a-file" / "bundle")], capsys)  # --out under a file
    assert rc == 1
    _one_line_error(err, "a-file")
    rc, err = _export([str(ckpt), "--out", str(tmp_path / ("x" * 300))], capsys)  # a name too long
    assert rc == 1
    _one_line_error(err, "File name too long")

    import tempfile

    def read_only(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # what a read-only mount answers
    rc, err = _export([str(ckpt), "--out", str(tmp_path / "ro" / "bundle")], capsys)
    assert rc == 1
    _one_line_error(err, "Read-only file system")


def test_export_command_line_prints_no_traceback(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, [1])
    proc = subprocess.run([sys.executable, "-m", "export", str(ckpt), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_line_error(proc.stderr, "a model config is a JSON object")

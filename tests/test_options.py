"""engine.options.AnswerOptions owns every answering option: its name, default, alias and check.
The public signatures that spell the options out must match it (names, order, defaults, and
defaults read from it rather than written again), and no other module may write an option's
default value itself."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import api, dynamic_batching
from engine.api import Engine
from engine.errors import InvalidInputError, UnknownOptionError
from engine.options import ALIASES, DEFAULTS, AnswerOptions, option_arguments, option_defaults

ROOT = Path(__file__).resolve().parents[1]
NOT_OPTIONS = {"model", "backend", "precision", "should_stop"}  # keyword arguments that are not answering options
PUBLIC: list[Callable[..., Any]] = [api.answer, Engine.answer, Engine.answer_batch]


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f.__qualname__)
def test_public_signatures_take_the_options_with_the_dataclass_defaults(function: Callable[..., Any]) -> None:
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_OPTIONS]
    assert [(p.name, p.default) for p in params] == list(option_defaults().items())
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    assert isinstance(node, ast.FunctionDef)
    for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
        if arg.arg in NOT_OPTIONS:
            continue
        want = "None" if arg.arg in ALIASES else f"DEFAULTS.{arg.arg}"  # read from the dataclass, never written again
        assert default is not None and ast.unparse(default) == want, (function.__qualname__, arg.arg)


def test_the_option_names_are_the_dataclass_fields_and_their_aliases() -> None:
    fields = [f.name for f in dataclasses.fields(AnswerOptions)]
    assert [n for n in option_defaults() if n not in ALIASES] == fields
    assert set(ALIASES.values()) <= set(fields)
    assert dynamic_batching._OPTION_DEFAULTS == option_defaults()
    assert option_arguments({"top_k": 3, "self": object(), "question": "q"}) == {"top_k": 3}


def _literal_defaults(path: Path, root: Path = ROOT) -> list[str]:
    """Places in ``path`` that write an option's default value as a literal: a parameter default,
    a class field, a call's keyword, an argparse ``--option`` default or a dict entry."""
    defaults = {k: v for k, v in option_defaults().items() if v is not None}  # None means "not given"
    found: list[tuple[str, ast.expr]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            found += [(arg.arg, d) for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults)]
            found += [(arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            found.append((node.target.id, node.value))
        elif isinstance(node, ast.Call):
            found += [(k.arg, k.value) for k in node.keywords if k.arg]
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("--"):
                found += [(first.value[2:].replace("-", "_"), k.value) for k in node.keywords if k.arg == "default"]
        elif isinstance(node, ast.Dict):
            found += [(k.value, v) for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return [f"{path.relative_to(root)}:{value.lineno}: {name}={value.value!r}" for name, value in found
            if name in defaults and isinstance(value, ast.Constant) and type(value.value) is type(defaults[name])
            and value.value == defaults[name]]


def test_each_default_is_written_once() -> None:
    sources = sorted(p for d in ("engine", "export", "bench", "examples") for p in (ROOT / d).rglob("*.py"))
    copies = [hit for p in sources for hit in _literal_defaults(p)]
    assert len(copies) == len(option_defaults()) - sum(v is None for v in option_defaults().values())
    assert all(hit.startswith("engine/options.py:") for hit in copies), copies


def test_the_scan_finds_a_copied_default(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(*, max_answer_len: int = %d, top_k=5):\n    return dict(align_to_words=True)\n"
                      % DEFAULTS.max_answer_len)
    assert _literal_defaults(sample, tmp_path) == [f"sample.py:1: max_answer_len={DEFAULTS.max_answer_len}",
                                                   "sample.py:2: align_to_words=True"]


# ---- the checks -----------------------------------------------------------------------------------------
def test_values_are_checked_and_normalised() -> None:
    opts = AnswerOptions(top_k=np.int64(3), null_threshold=np.float32(0.5), handle_impossible=np.bool_(True))
    assert (type(opts.top_k), type(opts.null_threshold), type(opts.handle_impossible)) == (int, float, bool)
    assert AnswerOptions(handle_impossible_answer=True).handle_impossible
    with pytest.raises(InvalidInputError, match="disagree"):
        AnswerOptions(handle_impossible=True, handle_impossible_answer=False)
    with pytest.raises(InvalidInputError, match="top_k must be between 1 and 1000"):
        AnswerOptions(top_k=0)
    with pytest.raises(InvalidInputError, match="align_to_words must be True or False"):
        AnswerOptions(align_to_words=1)  # type: ignore[arg-type]
    with pytest.raises(UnknownOptionError, match=r"topk \(topk: use top_k.*known: top_k, .*handle_impossible \(or "
                                                 r"handle_impossible_answer\)"):
        AnswerOptions.of_call({}, {"topk": 2})


def test_resolve_fills_or_checks_max_seq_len_against_the_model() -> None:
    assert DEFAULTS.resolve(64, 3).max_seq_len == 64
    assert AnswerOptions(max_seq_len=np.int32(20)).resolve(64, 3).max_seq_len == 20
    with pytest.raises(InvalidInputError, match="max_seq_len must be between 5 and 64"):
        AnswerOptions(max_seq_len=65).resolve(64, 3)
    with pytest.raises(InvalidInputError, match="max_seq_len must be an int"):
        AnswerOptions(max_seq_len="64")  # type: ignore[arg-type]
    assert AnswerOptions(top_k=3).candidates_per_window() == 16 and AnswerOptions(top_k=3, align_to_words=False) \
        .candidates_per_window() == 3

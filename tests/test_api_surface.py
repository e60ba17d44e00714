"""The public surface: every error type is importable from ``engine``, and the public names stay
where users import them."""

from __future__ import annotations

import inspect

import engine
from engine import errors


def test_every_error_type_is_exported_from_engine() -> None:
    kinds = {name for name, value in vars(errors).items() if inspect.isclass(value) and issubclass(value, Exception)}
    assert {"SpanRTError", "QueueFullError", "RequestTimeoutError", "WorkerDiedError"} <= kinds
    for name in kinds:
        assert getattr(engine, name) is getattr(errors, name), name
        assert name in engine.__all__, name
        assert issubclass(getattr(errors, name), errors.SpanRTError), name


def test_public_names_stay_importable() -> None:
    import engine.api
    import engine.dynamic_batching
    import engine.hf_pipeline

    assert engine.Engine is engine.api.Engine and engine.answer is engine.api.answer
    assert engine.pipeline is engine.hf_pipeline.pipeline and engine.QAPipeline is engine.hf_pipeline.QAPipeline
    assert engine.BatchingEngine is engine.dynamic_batching.BatchingEngine
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name

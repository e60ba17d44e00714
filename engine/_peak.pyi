"""This CPU's int8 and fp32 arithmetic peak (multiply-add loops on every thread). Use bench.peak."""

from typing import TypedDict

class KernelInfo(TypedDict):
    kind: str
    isa: str
    ops_per_instruction: float
    instructions_per_iteration: int
    supported: bool

def peak_ops(kind: str, *, isa: str | None = None, threads: int, seconds: float) -> tuple[float, str]:
    """(ops_per_s, isa): a multiply-add loop of `kind` ("int8" or "fp32") on `threads` threads; 1 MAC = 2 ops."""

def kernels() -> list[KernelInfo]:
    """Every peak kernel of this build, whether it runs here, and how its operations are counted."""

def supported_isas(kind: str) -> list[str]:
    """The ISAs of `kind` whose peak kernel runs on this CPU, best first."""

"""SpanRT's native encoder (kernels/encoder/): importable on every CPU; use engine.backends.native."""

from typing import Any

import numpy as np
import numpy.typing as npt

def cpu_features() -> dict[str, bool | str]: ...
def known_isas() -> list[str]: ...
def runnable_isas() -> list[str]: ...
def isa_status() -> list[tuple[str, str]]: ...
def isa_precisions(isa: str) -> list[str]: ...

class Encoder:
    precision: str
    threads: int
    isa: str
    linear_layers: str
    attention: str

    def __init__(self, config: dict[str, Any], weights: dict[str, npt.NDArray[np.float32]], precision: str, threads: int,
                 isa: str = "") -> None: ...
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        token_type_ids: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

"""SpanRT's native AMX encoder (kernels/encoder_cpu.cpp). Import only where engine._kernels.amx_status() is true."""

from typing import Any

import numpy as np
import numpy.typing as npt

class Encoder:
    precision: str
    threads: int

    def __init__(self, config: dict[str, Any], weights: dict[str, npt.NDArray[np.float32]], precision: str, threads: int) -> None: ...
    def forward(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        token_type_ids: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...

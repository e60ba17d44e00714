"""Views of CUDA memory that the CUDA span decoder reads in place (no backend owns this)."""

from __future__ import annotations

from typing import Any


class DeviceArray:
    """A view of CUDA memory for the decoder (``__cuda_array_interface__`` v3); ``owner`` keeps it alive."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str, stream: int | None, owner: Any) -> None:
        self.owner = owner
        self.shape = tuple(int(s) for s in shape)
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": typestr, "data": (int(ptr), False),
                                         "strides": None, "version": 3, "stream": stream}

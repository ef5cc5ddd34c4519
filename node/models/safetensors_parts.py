"""Parts of the tensors of a safetensors file, read from disk byte range by byte range.

A memory map of the file (safetensors' `safe_open(...).get_slice`) copies out only the bytes asked for,
but every page fault brings the kernel's read-ahead window around it into the page cache (8 MiB on
this box's disk): a tensor-parallel rank reading its half of each tensor read nearly the whole file.
Here the file is read with positioned reads of exactly the part's bytes, read-ahead off for it
(POSIX_FADV_RANDOM): rows [start, end) are one read; columns [start, end) of a 2-D tensor one read per
row. The format: 8 bytes of header length (little-endian), a JSON header naming each tensor's dtype,
shape and [begin, end) data offsets after the header, then the data (little-endian, row-major).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from node.errors import ModelFormatError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
Range = tuple[int, int]


class SafetensorsParts:
    """An open safetensors file whose tensors are read in parts (`read`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: only the bytes asked for
            (length,) = struct.unpack("<Q", self._pread(8, 0))
            header: dict[str, Any] = json.loads(self._pread(length, 8))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            os.close(self._fd)
            raise ModelFormatError(f"{self.path.name} is not a safetensors file: {e}", path=str(self.path)) from e
        header.pop("__metadata__", None)
        self._data_start = 8 + length
        self._tensors = header

    def keys(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str, part: tuple[int, tuple[Range, ...]] | None = None) -> torch.Tensor:
        """Tensor `name`, or `part`: (dimension 0 or 1, the [start, end) ranges along it, joined in order)."""
        info = self._tensors[name]
        dtype, shape = _DTYPES[info["dtype"]], list(info["shape"])
        offset = self._data_start + info["data_offsets"][0]
        if not shape:
            return self._read_into(torch.empty((), dtype=dtype), offset)
        dim, ranges = part if part is not None else (0, ((0, shape[0]),))
        item = torch.empty((), dtype=dtype).element_size()
        row_bytes = math.prod(shape[1:]) * item
        pieces = []
        for start, end in ranges:
            if dim == 0:
                pieces.append(self._read_into(torch.empty((end - start, *shape[1:]), dtype=dtype),
                                              offset + start * row_bytes))
            else:  # columns of a matrix: a run of bytes in every row
                out = torch.empty((shape[0], end - start), dtype=dtype)
                for row in range(shape[0]):
                    self._read_into(out[row], offset + row * row_bytes + start * item)
                pieces.append(out)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def _read_into(self, tensor: torch.Tensor, offset: int) -> torch.Tensor:
        view = tensor.view(-1).view(torch.uint8).numpy().data  # the tensor's own bytes
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise ModelFormatError(f"{self.path.name} ends inside a tensor", path=str(self.path))
            done += n
        return tensor

    def _pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{size} bytes at {offset} past the end")
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> SafetensorsParts:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

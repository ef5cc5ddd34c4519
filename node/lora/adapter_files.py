"""An adapter's two files: hashed, header-checked and sliced from the same bytes, or gathered unhashed.

Two ways in:
- `read` (a copy not yet trusted): both files are read exactly once into memory. The registry hash
  (`content_hash.adapter_files_sha256`, the folder rule the CLI registers with) is computed on those
  bytes, the safetensors header is checked against them (the tensors must tile the data exactly), and
  the tensors the parser asks for are sliced from them. What was hashed is what is parsed: a file
  changed on disk between the check and the parse cannot slip through.
- `open` (a disk cache copy, verified when it entered the cache): only the config and the header are
  read; `gather` then reads the tensor bytes with one `preadv` straight into the stacks the parser
  lays out (no whole-file buffer, no second copy). The header is checked exactly as above.
Nothing here ever unpickles: a pickle or a torch.save zip is refused by its first bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch

from node.errors import AdapterFormatError
from node.lora.chat_template_file import read_chat_template
from node.lora.content_hash import ADAPTER_FILES, adapter_files_sha256
from node.lora.host_buffer import HostBufferPool

CONFIG_FILE, WEIGHTS_FILE = ADAPTER_FILES
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_CACHED_LAYOUTS = 64
_LAYOUTS: dict[tuple[bytes, int], dict[str, TensorEntry]] = {}  # (header bytes, file size) -> layout
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers per preadv
Parts = tuple[tuple[int, int] | int, ...]  # byte ranges of the file ((begin, end)) and runs of zero bytes
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_BUFFERS = HostBufferPool()  # what `gather` reads into (not pinned), reused once the adapter read into it is gone


class TensorEntry(NamedTuple):  # a NamedTuple: a header has a few hundred of them, built on every load
    dtype: str  # the safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int  # byte offsets in the whole file (header included)
    end: int


@dataclass(frozen=True)
class AdapterFiles:
    folder: Path
    config_bytes: bytes
    weights: bytearray | None  # the whole safetensors file; None when `open`ed (read on demand)
    size: int  # bytes of the safetensors file
    head: bytes = b""  # its header's JSON bytes, when `open`ed
    # parsed and found servable (finite weights) at an earlier load of the same disk cache entry, whose
    # files are trusted not to change while it is cached (`again`, `DiskCache.vet`): the parser skips
    # the finiteness check
    is_vetted: bool = False
    # the weights file, open: a disk cache entry's, kept open by the cache while the entry is leased
    # (`DiskCache.recall`); `gather` reads it without looking up the path
    fd: int | None = None

    @classmethod
    def read(cls, folder: str | Path) -> AdapterFiles:
        """Read both files (one read each). AdapterFormatError names a missing or pickled file."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise AdapterFormatError(f"{CONFIG_FILE} is missing", folder=str(folder))
        if not (folder / WEIGHTS_FILE).is_file():
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
            why = f"; pickled files are refused: {pickles}" if pickles else ""
            raise AdapterFormatError(f"{WEIGHTS_FILE} is missing{why}", folder=str(folder))
        weights = _read_whole(folder / WEIGHTS_FILE)
        return cls(folder, (folder / CONFIG_FILE).read_bytes(), weights, len(weights))

    @classmethod
    def open(cls, folder: str | Path, is_vetted: bool = False) -> AdapterFiles:
        """The config and the safetensors header only (two small reads); `gather` reads the tensors.

        For copies verified before they entered the disk cache: nothing here hashes them."""
        folder = Path(folder)
        config_bytes = _read_small(os.path.join(folder, CONFIG_FILE))
        fd = os.open(os.path.join(folder, WEIGHTS_FILE), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            header_len = _header_length(os.pread(fd, 8, 0), size)
            head = os.pread(fd, header_len, 8)
        finally:
            os.close(fd)
        if len(head) != header_len:
            raise AdapterFormatError(f"{WEIGHTS_FILE} shrank while it was read", file=WEIGHTS_FILE)
        return cls(folder, config_bytes, None, size, head, is_vetted)

    @cached_property
    def data(self) -> bytearray:
        """The whole safetensors file (read now if `open`ed: the parser's rare mixed-dtype path)."""
        if self.weights is not None:
            return self.weights
        data = _read_whole(self.folder / WEIGHTS_FILE)
        if len(data) != self.size or bytes(data[8:8 + len(self.head)]) != self.head:
            raise AdapterFormatError(f"{WEIGHTS_FILE} changed since it was opened", file=WEIGHTS_FILE)
        return data

    def again(self, fd: int | None = None) -> AdapterFiles:
        """A new handle on the same `open`ed files, vetted, with what was parsed of them (config, header,
        chat template) but not the whole file if the parser read it: for a disk cache entry whose files
        were parsed and found servable, and do not change while it is cached, so that its next load
        reads only the tensor bytes and checks nothing again."""
        assert self.weights is None, "only an opened copy is kept for its next load"
        files = AdapterFiles(self.folder, self.config_bytes, None, self.size, self.head, is_vetted=True, fd=fd)
        for name in ("config", "header", "header_bytes", "chat_template"):
            if name in self.__dict__:  # computed cached_property values
                files.__dict__[name] = self.__dict__[name]
        return files

    @cached_property
    def chat_template(self) -> str | None:
        """The adapter's own chat template, from the files beside these two (node/lora/chat_template_file.py)."""
        return read_chat_template(self.folder)

    def sha256(self) -> bytes:
        """The registry's weightsSha256 of exactly these bytes."""
        return adapter_files_sha256(self.config_bytes, self.data)

    def check(self) -> None:
        """Refuse a config that is not a JSON object or weights that are not well-formed safetensors."""
        _ = self.config, self.header

    @cached_property
    def config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}", file=CONFIG_FILE,
                                     folder=str(self.folder)) from e
        if not isinstance(config, dict):
            raise AdapterFormatError(f"{CONFIG_FILE} is not a JSON object", file=CONFIG_FILE,
                                     folder=str(self.folder))
        return config

    @cached_property
    def header_bytes(self) -> bytes:
        """The safetensors header's JSON bytes (AdapterFormatError if the file cannot be safetensors)."""
        if self.weights is None:
            return self.head
        return _header_bytes(WEIGHTS_FILE, self.weights)

    @cached_property
    def header(self) -> dict[str, TensorEntry]:
        """The tensors of the safetensors file, checked to tile its data exactly (no gaps, no overlap).

        Adapters of one shape share their header byte for byte, so the checked layout is kept per
        (header bytes, file size): what it says depends on nothing else. Treat it as read-only."""
        key = (self.header_bytes, self.size)
        layout = _LAYOUTS.get(key)
        if layout is None:
            layout = _parse_header(WEIGHTS_FILE, self.header_bytes, self.size)
            if len(_LAYOUTS) >= MAX_CACHED_LAYOUTS:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
        return layout

    def tensor(self, name: str) -> torch.Tensor:
        """A view of one tensor's bytes (a copy only if they are misaligned for their dtype)."""
        entry = self.header[name]
        dtype = FLOAT_DTYPES.get(entry.dtype)
        if dtype is None:
            raise AdapterFormatError(f"tensor {name} is {entry.dtype}; LoRA weights must be floating point",
                                     tensor=name, dtype=entry.dtype)
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        buffer: bytes | bytearray = self.data
        offset = entry.begin
        if offset % DTYPE_BYTES[entry.dtype]:
            buffer, offset = bytes(self.data[entry.begin:entry.end]), 0
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(entry.shape)

    def gather(self, plan: GatherPlan, pin_memory: bool = False) -> torch.Tensor:
        """The plan's byte ranges of the file and runs of zero bytes, concatenated into one new uint8
        tensor [plan.nbytes] (in pinned memory if asked). Copied from memory if the file is there, else
        one `preadv` per contiguous run of the file straight into place (one run for a whole adapter)."""
        if pin_memory:
            out = torch.empty(plan.nbytes, dtype=torch.uint8, pin_memory=True)
            dest = out.numpy().data  # a writable memoryview of the tensor
            iovecs = [[dest[begin:end] for begin, end in pieces] for _, pieces in plan.runs]
        else:  # a block loads have used before (faulted in), with its iovecs for this plan
            out, iovecs = _BUFFERS.take(plan.nbytes, plan, plan.run_pieces)
        for begin, end in plan.zeros:
            out[begin:end].zero_()
        if self.weights is not None:
            source = memoryview(self.weights)
            for (offset, _), views in zip(plan.runs, iovecs, strict=True):
                for view in views:
                    view[:] = source[offset:offset + len(view)]
                    offset += len(view)
            return out
        fd = self.fd if self.fd is not None else os.open(os.path.join(self.folder, WEIGHTS_FILE), os.O_RDONLY)
        try:
            if self.fd is None and os.fstat(fd).st_size != self.size:  # (`recall` checked a kept one)
                raise AdapterFormatError(f"{WEIGHTS_FILE} changed since it was opened", file=WEIGHTS_FILE)
            for (offset, _), views, nbytes in zip(plan.runs, iovecs, plan.run_nbytes, strict=True):
                if os.preadv(fd, views, offset) != nbytes:
                    raise AdapterFormatError(f"{WEIGHTS_FILE} shrank while it was read", file=WEIGHTS_FILE)
        finally:
            if self.fd is None:
                os.close(fd)
        return out


@dataclass(frozen=True)
class GatherPlan:
    """Where each byte range of the file goes in a gathered buffer, worked out once per layout.

    runs: (file offset, ((begin, end) in the buffer, ...)): the file's bytes from the offset on fill
    those buffer ranges in order (at most IOV_MAX of them); zeros: buffer ranges of zero bytes;
    bounds: each layout's (begin, end) in the buffer."""

    nbytes: int
    runs: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    zeros: tuple[tuple[int, int], ...]
    bounds: tuple[tuple[int, int], ...]

    @cached_property
    def run_nbytes(self) -> tuple[int, ...]:
        """Bytes of each run."""
        return tuple(sum(end - begin for begin, end in pieces) for _, pieces in self.runs)

    @cached_property
    def run_pieces(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The buffer ranges of each run."""
        return tuple(pieces for _, pieces in self.runs)

    @classmethod
    def of(cls, layouts: Sequence[Parts]) -> GatherPlan:
        """For layouts of byte ranges of the file ((begin, end)) and runs of zero bytes (an int)."""
        pieces, zeros, bounds, position = [], [], [], 0
        for parts in layouts:
            start = position
            for part in parts:
                n = part if isinstance(part, int) else part[1] - part[0]
                if isinstance(part, int):
                    zeros.append((position, position + n))
                else:
                    pieces.append((part[0], position, position + n))
                position += n
            bounds.append((start, position))
        runs: list[tuple[int, list[tuple[int, int]]]] = []
        next_offset = -1
        for offset, begin, end in sorted(pieces):
            if offset != next_offset or len(runs[-1][1]) >= IOV_MAX:
                runs.append((offset, []))
            runs[-1][1].append((begin, end))
            next_offset = offset + end - begin
        return cls(position, tuple((offset, tuple(ranges)) for offset, ranges in runs), tuple(zeros), tuple(bounds))


def parse_safetensors_header(name: str, data: bytes | bytearray) -> dict[str, TensorEntry]:
    """The header of a safetensors file held in `data`; AdapterFormatError unless it tiles the file."""
    return _parse_header(name, _header_bytes(name, data), len(data))


def _header_bytes(name: str, data: bytes | bytearray) -> bytes:
    header_len = _header_length(bytes(data[:8]), len(data), name)
    return bytes(data[8:8 + header_len])


def _header_length(head: bytes, size: int, name: str = WEIGHTS_FILE) -> int:
    """The header's length from the file's first 8 bytes; AdapterFormatError unless it fits the file."""
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(_not_safetensors(head), file=name, size=size)
    return header_len


def _parse_header(name: str, raw: bytes, size: int) -> dict[str, TensorEntry]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{name}: corrupted safetensors header ({e})", file=name) from e
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name}: corrupted safetensors header", file=name)
    return _tensor_layout(name, header, 8 + len(raw), size)


def _tensor_layout(name: str, header: dict[str, Any], start: int, size: int) -> dict[str, TensorEntry]:
    data_bytes = size - start
    entries: dict[str, TensorEntry] = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            dims = tuple(int(d) for d in shape)
            ok = (min(dims, default=0) >= 0 and 0 <= begin <= end <= data_bytes
                  and end - begin == math.prod(dims) * DTYPE_BYTES[dtype])
        except (TypeError, KeyError, ValueError) as e:
            raise AdapterFormatError(f"{name}: bad entry for tensor {tensor}", file=name,
                                     tensor=tensor) from e
        if not ok:
            raise AdapterFormatError(f"{name}: tensor {tensor} does not fit the file (truncated or "
                                     "corrupted)", file=name, tensor=tensor, data_bytes=data_bytes)
        entries[tensor] = TensorEntry(dtype, dims, start + int(begin), start + int(end))
    covered = sorted((e.begin, e.end) for e in entries.values())
    position = start
    for begin, end in covered:
        if begin != position:
            raise AdapterFormatError(f"{name}: tensors overlap or leave a gap at byte {position}",
                                     file=name, data_bytes=data_bytes)
        position = end
    if position != size:
        raise AdapterFormatError(f"{name}: {size - position} bytes after the last tensor",
                                 file=name, data_bytes=data_bytes)
    return entries


def _not_safetensors(head: bytes) -> str:
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{WEIGHTS_FILE} is a Python pickle; only safetensors are read"
    if head[:4] == b"PK\x03\x04":
        return f"{WEIGHTS_FILE} is a torch.save zip (pickle inside); only safetensors are read"
    return f"{WEIGHTS_FILE} is not a safetensors file (corrupted or truncated header)"


def _read_small(path: str) -> bytes:
    """A small file in one read (no buffered file object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        while len(data) <= size and (more := os.read(fd, size + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    return data


def _read_whole(path: Path) -> bytearray:
    """The file in one preallocated buffer (one `readinto` for a file in the page cache)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            n = f.readinto(view[filled:])
            if not n:
                raise AdapterFormatError(f"{path.name} shrank while it was read", file=path.name)
            filled += n
        if f.read(1):
            raise AdapterFormatError(f"{path.name} grew while it was read", file=path.name)
    return buffer

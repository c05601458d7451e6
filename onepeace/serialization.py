"""Reading `torch.save` zip files without running their pickles' code, and without reading every tensor.

A released ONE-PEACE checkpoint pickles objects of its training toolkit's own classes (meters in
`extra_state`). `torch.load(weights_only=True)` refuses such a file and a plain `torch.load` needs
the toolkit installed and would run whatever the pickle names. :class:`RestrictedUnpickler` instead
rebuilds only tensors, containers and primitives; any other global becomes an inert
:class:`Placeholder` that records its name and arguments and is never called.

Tensors come back as :class:`LazyTensor` records (shape, dtype, where the bytes are); their bytes are
read only by :meth:`LazyTensor.load`, straight from a memory map of the file, so a caller can skip
whole branches of a 4B-parameter model without reading them.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import torch

# storage type names as pickled by torch.save -> dtype
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


#: Largest `data.pkl` (uncompressed bytes, as the zip directory declares it) read from a checkpoint.
#: A pickle only describes the tensors (their bytes are separate files in the zip): the released
#: 4B model's is well under 1 MB. A deflated pickle can expand ~1000x (a 306 KB file cost 1.15 GB),
#: so a larger one is refused before it is read. Raise it with
#: ``onepeace.serialization.MAX_PICKLE_BYTES = N`` (None disables the check).
MAX_PICKLE_BYTES: int | None = 64 * 1024 * 1024


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint's pickle asked for something we refuse to do (a ValueError too, so that callers
    catching bad input, like the CLI, report it as an error instead of a traceback)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is damaged or crafted (bad zip, bad CRC, a tensor outside its storage...);
    the message names the file."""


class Placeholder:
    """Stands in for an object of a class we do not trust or do not have. Never calls anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # a pickle may also append/setitem into an object it built
    def append(self, item: Any) -> None:
        self.args = self.args + (item,)

    def extend(self, items: Any) -> None:
        self.args = self.args + tuple(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.kwargs[key] = value

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).qualified_name}>"

    qualified_name = "?"


def _placeholder_class(module: str, name: str) -> type:
    return type(f"Placeholder[{module}.{name}]", (Placeholder,), {"qualified_name": f"{module}.{name}"})


@dataclass
class _LazyStorage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass
class LazyTensor:
    """A tensor in a checkpoint file that has not been read yet."""

    storage: _LazyStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    archive: "CheckpointArchive"

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def problem(self) -> str | None:
        """Why this tensor must not be read (None: it is fine). A tensor may not reach outside its
        storage, and may not hold more elements than its storage (a stride-0 tensor of a huge shape
        over a 1-element storage costs its full size when copied out: 1.3 GB from an 18 MB file)."""
        shape, stride, numel = self.shape, self.stride, self.storage.numel
        if len(shape) != len(stride) or any(not isinstance(v, int) or v < 0 for v in shape + stride):
            return f"invalid shape {shape} / stride {stride}"
        if self.offset < 0:
            return f"negative storage offset {self.offset}"
        if self.numel() == 0:
            return None
        need = self.offset + sum((n - 1) * st for n, st in zip(shape, stride)) + 1  # last element read + 1
        if need > numel:
            return (f"shape {shape} with stride {stride} at offset {self.offset} needs {need} elements "
                    f"but its storage {self.storage.key!r} holds {numel}")
        if self.numel() > numel:
            return (f"shape {shape} ({self.numel()} elements) with stride {stride} expands its storage "
                    f"{self.storage.key!r} of {numel} elements (overlapping strides are refused)")
        return None

    def load(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             release: bool = False) -> torch.Tensor:
        """Read the bytes (from the memory map, no intermediate copy) and return a fresh tensor,
        cast to `dtype`. release=True then drops the file's pages from this process's memory, so
        loading a large model never holds the file's bytes AND the weights at once.
        Raises CorruptCheckpointError for a tensor that does not fit its storage (see `problem`)."""
        problem = self.problem()
        if problem is not None:
            raise CorruptCheckpointError(f"{self.archive.path!r}: tensor {problem}")
        base = self.archive.storage_tensor(self.storage)
        t = base.as_strided(self.shape, self.stride, self.offset)
        out = t.to(device=device, dtype=dtype or t.dtype, copy=True)
        if release:
            self.archive.release(self.storage)
        return out


_ALLOWED_CONTAINERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}


class CheckpointArchive:
    """An open `torch.save` zip file: its pickle (restricted) and memory-mapped storages."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            with open(self.path, "rb") as f:
                head = f.read(8)
            raise ValueError(
                f"{self.path!r} is not a torch zip checkpoint (legacy pre-1.6 torch.save files and other "
                f"formats are not supported; first bytes {head!r})"
            ) from None
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise ValueError(f"{self.path!r} has no data.pkl: not a torch.save checkpoint")
        self._pickle_name = pkl[0]
        self._prefix = pkl[0][: -len("data.pkl")]
        self._file = open(self.path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._storages: dict[str, torch.Tensor] = {}
        self._ranges: dict[str, tuple[int, int]] = {}  # storage key -> (byte offset, byte length)

    def close(self) -> None:
        self._storages.clear()
        try:
            self._mmap.close()
        except BufferError:  # a tensor still views the map; the OS frees it when that tensor dies
            pass
        self._file.close()
        self._zip.close()

    def __enter__(self) -> "CheckpointArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read_object(self, allow_unsafe: bool = False) -> Any:
        """Unpickle data.pkl. Tensors become :class:`LazyTensor`; unknown globals become placeholders.

        allow_unsafe=True uses torch.load's full unpickler instead (runs arbitrary code: trusted files only).
        """
        if allow_unsafe:
            return torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)
        info = self._zip.getinfo(self._pickle_name)
        limit = MAX_PICKLE_BYTES
        if limit is not None and info.file_size > limit:  # the declared size: checked before inflating
            raise CorruptCheckpointError(
                f"{self.path!r}: its {self._pickle_name} is {info.file_size} bytes uncompressed, above the "
                f"limit of {limit} (a checkpoint's pickle only describes its tensors; a huge one is damaged "
                "or crafted). If you trust this file, raise onepeace.serialization.MAX_PICKLE_BYTES")
        try:
            with self._zip.open(info) as f:  # reads at most the declared size; checks the CRC at the end
                data = f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise CorruptCheckpointError(f"{self.path!r}: cannot read {self._pickle_name}: {exc}") from exc
        try:
            return RestrictedUnpickler(io.BytesIO(data), self).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, RecursionError, MemoryError) as exc:
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{self.path!r}: {exc}") from exc
            raise CorruptCheckpointError(f"{self.path!r}: cannot unpickle {self._pickle_name}: "
                                         f"{type(exc).__name__}: {exc}") from exc

    def release(self, storage: _LazyStorage) -> None:
        """Forget a storage's bytes: drop the cached view and tell the kernel we no longer need its
        pages (the mapping is read-only and file-backed: a later read just faults them back in)."""
        self._storages.pop(storage.key, None)
        start, length = self._ranges.get(storage.key, (0, 0))
        page = mmap.PAGESIZE
        first = (start + page - 1) // page * page  # whole pages inside this storage only
        last = (start + length) // page * page
        if last > first and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)

    def storage_tensor(self, storage: _LazyStorage) -> torch.Tensor:
        """A flat tensor viewing the storage's bytes in the memory map."""
        cached = self._storages.get(storage.key)
        if cached is not None:
            return cached
        try:
            info = self._zip.getinfo(f"{self._prefix}data/{storage.key}")
        except KeyError:
            raise CorruptCheckpointError(f"{self.path!r}: the pickle names storage {storage.key!r}, "
                                         "which the file does not hold") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(
                f"{self.path!r}: storage {storage.key} is compressed; torch.save never does that")
        # local file header: 30 bytes + file name + extra field, then the data
        header = self._mmap[info.header_offset: info.header_offset + 30]
        name_len = int.from_bytes(header[26:28], "little")
        extra_len = int.from_bytes(header[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        itemsize = torch.empty((), dtype=storage.dtype).element_size()
        self._ranges[storage.key] = (start, storage.numel * itemsize)
        if info.file_size < storage.numel * itemsize:
            raise CorruptCheckpointError(f"{self.path!r}: storage {storage.key} is truncated")
        if storage.numel == 0:
            t = torch.empty(0, dtype=storage.dtype)
        else:
            import warnings

            with warnings.catch_warnings():  # the map is read-only; we only ever copy out of it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(self._mmap, dtype=storage.dtype, count=storage.numel, offset=start)
        self._storages[storage.key] = t
        return t


def _rebuild_tensor(storage: _LazyStorage, storage_offset: int, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None) -> LazyTensor:
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), archive=None)  # archive set below


def _rebuild_parameter(data: LazyTensor, requires_grad: bool = True, backward_hooks=None, *args) -> LazyTensor:
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors (lazily), containers and primitives; everything else becomes a Placeholder."""

    def __init__(self, file, archive: CheckpointArchive):
        super().__init__(file)
        self.archive = archive
        self.placeholders: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_CONTAINERS:
            return _ALLOWED_CONTAINERS[(module, name)]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            archive = self.archive

            def rebuild(*args, **kwargs):
                t = _rebuild_tensor(*args, **kwargs)
                t.archive = archive
                return t

            return rebuild
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # the storage "class" is only used as a dtype marker
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64"):
            return getattr(torch, name)
        self.placeholders.append(f"{module}.{name}")
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> _LazyStorage:
        # ('storage', storage_type, key, location, numel)
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if isinstance(storage_type, torch.dtype):
            dtype = storage_type
        else:
            raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
        return _LazyStorage(str(key), dtype, int(numel))


def read_checkpoint(path: str | os.PathLike, allow_unsafe: bool = False) -> tuple[Any, CheckpointArchive]:
    """Open a `torch.save` file; return (object with LazyTensor leaves, archive to close when done)."""
    archive = CheckpointArchive(path)
    try:
        obj = archive.read_object(allow_unsafe=allow_unsafe)
    except Exception:
        archive.close()
        raise
    return obj, archive

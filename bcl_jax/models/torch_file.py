"""Tensors from a `torch.save` file as NumPy arrays, without importing torch.

Reads the zip format that `torch.save` writes by default since PyTorch 1.6
(`<name>/data.pkl`, a pickle whose tensors refer by persistent id to the raw storages
`<name>/data/<key>`; `<name>/byteorder`). Only what a `state_dict` holds is rebuilt: tensors
(`torch._utils._rebuild_tensor_v2`), parameters and `collections.OrderedDict`; any other object
stops with an error, so, like `torch.load(weights_only=True)`, reading runs no code from the file.
The layout follows PyTorch's `torch/serialization.py` (`_save`, `_load`) and
`torch/_utils.py` (`_rebuild_tensor_v2`).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

ZIP_MAGIC = b'PK\x03\x04'

# torch.<Name>Storage, the typed-storage names that torch.save pickles, -> element type.
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
    """Stands for `torch.<Name>Storage` in the pickle: only its element type is needed."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """A contiguous copy of the strided view `storage[offset + sum(i_k * stride_k)]`."""
    del requires_grad, hooks, metadata
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f'bad tensor layout: size {size}, stride {stride}')
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= len(storage):
        raise pickle.UnpicklingError(
            f'tensor of size {size} (offset {offset}, stride {stride}) runs past its storage of '
            f'{len(storage)} elements'
        )
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad, hooks):
    del requires_grad, hooks
    return data


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f'the file holds a {module}.{name}; without torch only tensors in (nested) dicts '
            'are read: save `model.state_dict()`'
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'unknown persistent id {pid!r}')
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f'unknown storage type {storage_type!r}')
        if key not in self._storages:
            raw = self._archive.read(f'{self._prefix}data/{key}')
            dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
            array = np.frombuffer(raw, dtype)
            if len(array) < numel:
                raise pickle.UnpicklingError(
                    f'storage {key} holds {len(array)} elements, the pickle says {numel}'
                )
            self._storages[key] = array.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def load(data: bytes):
    """The object that `torch.save` wrote into the zip-format bytes `data`, its tensors as
    NumPy arrays (bfloat16 as `ml_dtypes.bfloat16`). Raises ValueError for another format and
    pickle.UnpicklingError for objects other than tensors, dicts and plain values."""
    if not data.startswith(ZIP_MAGIC):
        raise ValueError(
            'not a zip-format torch.save file (PyTorch >= 1.6 writes one by default; older '
            'files or _use_new_zipfile_serialization=False need torch to read)'
        )
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
        if len(pickles) != 1:
            raise ValueError(f'expected one <name>/data.pkl in the archive, found {pickles}')
        prefix = pickles[0][: -len('data.pkl')]
        names = set(archive.namelist())
        byteorder = 'little'
        if f'{prefix}byteorder' in names:
            byteorder = archive.read(f'{prefix}byteorder').decode().strip()
        return _Unpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()

"""Challenge ``.npz`` files read without running anything from them.

Loading object arrays the usual way unpickles them, and a pickle may call any function. Here numeric arrays are
read with ``allow_pickle=False``; the challenge format's object arrays (``boxes``: a list of box dicts or
None, ``text_prompts``: a dict of strings) go through an unpickler that builds numpy arrays, dtypes and scalars
and nothing else, so all it can return is plain data (dict, list, tuple, str, int, float, bool, None, numpy
scalars). Any other global in the pickle is refused before anything from the file runs.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from .errors import InputError

# numpy writes these under numpy.core (1.x) or numpy._core (2.x); the functions are taken from this numpy
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_PLAIN_GLOBALS = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, str, int, float, bool)},
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PLAIN_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain data") from None


def _object_array(stream, where: str) -> np.ndarray:
    try:
        array = _PlainDataUnpickler(stream).load()
    except pickle.UnpicklingError as exc:
        raise InputError(f"{where}: refused, its pickled content calls {str(exc).split(' is not')[0]}, which is "
                         "not plain data (nothing from the file was run)") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle raises whatever its opcodes lead to
        raise InputError(f"{where}: its object array cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"{where}: the object entry holds a {type(array).__name__}, not an array")
    return array


def _member(archive: zipfile.ZipFile, name: str, where: str) -> np.ndarray:
    with archive.open(name) as stream:
        version = npy.read_magic(stream)
        if version == (1, 0):
            _, _, dtype = npy.read_array_header_1_0(stream)
        elif version == (2, 0):
            _, _, dtype = npy.read_array_header_2_0(stream)
        else:
            dtype = None  # other versions: numeric arrays only, through numpy's reader below
        if dtype is not None and dtype.hasobject:
            return _object_array(stream, where)
    with archive.open(name) as stream:
        return npy.read_array(stream, allow_pickle=False)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, by name; object arrays hold plain data only.

    Raises InputError for a file that is not an npz archive, an unreadable entry, or a pickle that reaches for
    anything but plain data.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path} is not an .npz archive ({exc}); nothing in it was read") from None
    arrays = {}
    with archive:
        for name in archive.namelist():
            key = name.removesuffix(".npy")
            where = f"{path} entry '{key}'"
            try:
                arrays[key] = _member(archive, name, where)
            except InputError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation) as exc:
                raise InputError(f"{where} cannot be read ({type(exc).__name__}: {exc})") from None
    return arrays


def numeric_array(arrays: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    """``arrays[key]`` after checking that it holds real numbers (bool, integers or floats)."""
    array = arrays[key]
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where}: '{key}' must be an array of numbers, got dtype {array.dtype}")
    return array

"""Reading the few-shot benchmarks' original files with one-line errors: the dataset error, existence and
HTML / truncation checks, pickle loading (Python 2 pickles too), keys of unpickled dicts, image decoding,
and finding which of a dataset's source forms a folder holds.

Every check raises a one-line `DatasetError` (a `ValueError`) that starts with the dataset's name and names
the file.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

_REQUIRED = object()
_HTML_PREFIXES = (b"<!doctype", b"<html")
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    UnicodeDecodeError,
    OverflowError,
)


def one_line(text: object) -> str:
    """`text` with line breaks turned into spaces (messages quote exceptions, which may span lines)."""
    return str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


class DatasetError(ValueError):
    """A dataset's files are missing, malformed or inconsistent: one line, starting with the dataset's name."""


def fail(dataset: str, message: str) -> DatasetError:
    return DatasetError(one_line(f"{dataset}: {message}"))


def check_not_html(dataset: str, path: Path, expected: str) -> None:
    """Raise if `path` is missing, empty, or an HTML page (a failed download) rather than `expected`."""
    if not path.is_file():
        raise fail(dataset, f"{path} not found; expected {expected}")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise fail(dataset, f"{path} is empty; expected {expected}")
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_PREFIXES):
        raise fail(dataset, f"{path} is an HTML page (a failed download?), not {expected}")


def check_pickle_complete(dataset: str, path: Path, expected: str) -> None:
    """Cheap checks of a (possibly huge) pickle before it is read: not HTML, and ending in pickle's STOP
    opcode (a truncated copy almost never does)."""
    check_not_html(dataset, path, expected)
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
    if last != b".":
        raise fail(dataset, f"{path} is truncated or not a pickle (it does not end like one); expected {expected}")


def load_pickle(dataset: str, path: Path, expected: str) -> Any:
    """Unpickle `path` (Python 2 pickles too: `encoding="latin1"`), rewording any failure as one line.
    Pickles can run code when loaded: only load trusted copies of the datasets."""
    check_pickle_complete(dataset, path, f"a pickle of {expected}")
    with open(path, "rb") as f:
        return unpickle(dataset, f, str(path), expected)


def unpickle(dataset: str, data: bytes | BinaryIO, where: str, expected: str) -> Any:
    """`pickle.load` of a file object or bytes (named `where` in messages), failures reworded as one line."""
    try:
        return pickle.load(io.BytesIO(data) if isinstance(data, bytes) else data, encoding="latin1")
    except _PICKLE_ERRORS as e:
        raise fail(dataset, f"{where} is truncated or not a pickle of {expected} ({type(e).__name__}: {e})") from e


def as_text(value: object) -> str:
    """A name from a pickle: `str`, or `bytes` (Python 2 / `encoding="bytes"` pickles) decoded."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def get_key(dataset: str, data: object, key: str, path: Path, expected: str, default: Any = _REQUIRED) -> Any:
    """`data[key]` from an unpickled dict whose keys may be `str` or `bytes`; a one-line error if absent
    (or `default`, when given)."""
    if not isinstance(data, Mapping):
        raise fail(dataset, f"{path} holds a {type(data).__name__}; expected a dict with {expected}")
    for k in (key, key.encode()):
        if k in data:
            return data[k]
    if default is not _REQUIRED:
        return default
    keys = sorted(as_text(k) for k in data)
    raise fail(dataset, f"{path} has no {key!r} key (keys: {keys}); expected a dict with {expected}")


def find_form(
    dataset: str, folder: Path, forms: Mapping[str, Mapping[str, Sequence[str]]]
) -> tuple[str, dict[str, Path]]:
    """The first form (role -> candidate names; a name ending in "/" is a folder) whose every role is
    present in `folder`, with each role's path. Raises a one-line error listing what each form expects."""
    best: tuple[int, str, list[str], list[str]] | None = None
    for form, roles in forms.items():
        found, missing = {}, []
        for role, candidates in roles.items():
            path = next((folder / c for c in candidates if _exists(folder / c, c.endswith("/"))), None)
            if path is None:
                missing.append(candidates[0])
            else:
                found[role] = path
        if not missing:
            return form, found
        if found and (best is None or len(found) > best[0]):
            best = (len(found), form, sorted(p.name for p in found.values()), missing)
    if best is not None:
        _, form, have, missing = best
        raise fail(
            dataset,
            f"{folder} holds {', '.join(have)} but not {', '.join(missing)}; expected all files of the {form} form",
        )
    wanted = " or ".join(", ".join(c[0] for c in roles.values()) for roles in forms.values())
    raise fail(dataset, f"{folder} holds none of the known files; expected {wanted}")


def _exists(path: Path, folder: bool) -> bool:
    return path.is_dir() if folder else path.is_file()


def decode_image(dataset: str, data: bytes | Path, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An encoded image (PNG/JPEG bytes or a file) as `uint8 [H, W, 3]` RGB; resized once to `size`
    (width, height) with PIL's LANCZOS filter when it differs. One-line error naming `where`."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            rgb = image.convert("RGB")
            if size is not None and rgb.size != size:
                rgb = rgb.resize(size, resample=Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise fail(dataset, f"{where} is not a readable image ({type(e).__name__}: {e})") from e


def form_paths(dataset: str, manual: Path | None, form: str, roles: Mapping[str, Sequence[str]],
               expected: str) -> dict[str, Path]:
    """The files of source `form` (role -> candidate names) in the builder's manual folder; one line if absent."""
    if manual is None:
        raise fail(dataset, f"no data folder given (manual_dir); expected one with {expected}")
    return find_form(dataset, manual, {form: roles})[1]

"""JSON read the way Go's encoding/json reads it into ocicrypt's structs.

containerd and ocicrypt marshal Go structs: field names match case-insensitively, []byte
travels as padded standard base64 (or, accepted on input, an array of numbers), and null
means a nil value. These helpers give the same answers for the fields we read.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable
from typing import Any

Pairs = list[tuple[str, Any]]


class GoJSONError(ValueError):
    """A value does not decode into the Go type expected for it."""


def loads(data: bytes | str) -> Any:
    """Parse JSON keeping every object as an ordered list of (key, value) pairs."""
    try:
        return json.loads(data, object_pairs_hook=_Object)
    except (ValueError, UnicodeDecodeError) as e:
        raise GoJSONError(f"not valid JSON: {e}") from e
    except RecursionError as e:
        raise GoJSONError("JSON nested too deeply") from e


class _Object(list[tuple[str, Any]]):
    """A JSON object as its pairs, in document order."""


def is_object(value: Any) -> bool:
    return isinstance(value, _Object)


def field(obj: Any, name: str) -> Any:
    """The value Go would store in struct field `name`: the last key equal to it ignoring case."""
    if not isinstance(obj, _Object):
        raise GoJSONError(f"expected a JSON object, got {_kind(obj)}")
    folded = name.casefold()
    found: Any = None
    for key, value in obj:
        if key == name or key.casefold() == folded:
            found = value
    return found


def items(obj: Any) -> list[tuple[str, Any]]:
    """A Go map's entries (later duplicates win), or [] for null."""
    if obj is None:
        return []
    if not isinstance(obj, _Object):
        raise GoJSONError(f"expected a JSON object, got {_kind(obj)}")
    return list(dict(obj).items())


def as_bytes(value: Any) -> bytes | None:
    """Decode a Go []byte: padded standard base64 (newlines skipped), or an array of numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.replace("\r", "").replace("\n", "")
        try:
            return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as e:
            raise GoJSONError("not valid padded standard base64") from e
    if isinstance(value, list):
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in value):
            return bytes(value)
        raise GoJSONError("byte array holds a value that is not a number from 0 to 255")
    raise GoJSONError(f"expected base64 text or an array of bytes, got {_kind(value)}")


def as_str(value: Any) -> str:
    """A Go string: null reads as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise GoJSONError(f"expected a string, got {_kind(value)}")


def as_int(value: Any) -> int:
    """A Go int64: null reads as 0."""
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise GoJSONError(f"expected an integer, got {_kind(value)}")


def as_list(value: Any, element: Callable[[Any], Any]) -> list[Any]:
    """A Go slice: null reads as []."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise GoJSONError(f"expected an array, got {_kind(value)}")
    return [element(v) for v in value]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"

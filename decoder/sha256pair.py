"""HMAC-SHA256 and SHA-256 streams on decoder._sha256pair: two streams hashed together.

A layer costs two SHA-256 passes: ocicrypt's HMAC over the ciphertext and the digest of the
plaintext. One SHA-256 stream leaves most of a core's SHA unit idle (each round waits for
the one before), so `MacAndDigest` feeds both streams to one core together, 1.7 times as
fast as one after the other on these machines, and leaves the other core to read, decrypt
and write. This file owns the padding, HMAC (RFC 2104) and the partial-block bookkeeping
around the C compression function; `mac_and_digest` returns None where the extension was not
built (no compiler at install time) or the CPU has no SHA extensions, and callers then use
cryptography's contexts.
"""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Any

BLOCK = 64
DIGEST_BYTES = 32
_INITIAL = struct.pack(  # FIPS 180-4, 5.3.3: H(0) for SHA-256, as native uint32 words
    "=8I", 0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
    0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
)
_looked_for = False
_module: ModuleType | None = None


def native() -> ModuleType | None:
    """The compression extension, when it is built and this CPU can run it."""
    global _looked_for, _module
    if not _looked_for:
        _looked_for = True
        try:
            from decoder import _sha256pair
        except ImportError:
            return None
        _module = _sha256pair if _sha256pair.USABLE else None
    return _module


class Sha256:
    """A SHA-256 stream: a state, the bytes of the block not yet complete, the length."""

    __slots__ = ("_compress", "length", "spent", "state", "tail")

    def __init__(self, compress: Any, state: bytes = _INITIAL, length: int = 0) -> None:
        self._compress = compress
        self.state = bytearray(state)
        self.tail = bytearray()
        self.length = length
        self.spent = False

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self.spent:
            raise ValueError("a finalized SHA-256 stream takes no more data")
        view = memoryview(data).cast("B")
        self.length += len(view)
        if self.tail:
            take = min(BLOCK - len(self.tail), len(view))
            self.tail += view[:take]
            view = view[take:]
            if len(self.tail) < BLOCK:
                return
            self._compress(self.state, self.tail)
            self.tail.clear()
        whole = len(view) - len(view) % BLOCK
        if whole:
            self._compress(self.state, view[:whole])
        self.tail += view[whole:]

    def finalize(self) -> bytes:
        """The digest; the stream is spent afterwards."""
        if self.spent:
            raise ValueError("this SHA-256 stream is already finalized")
        self.spent = True
        # FIPS 180-4, 5.1.1: a 1 bit, zeros to 56 mod 64 bytes, the bit length big-endian.
        zeros = (BLOCK - 9 - len(self.tail)) % BLOCK
        self.tail += b"\x80" + bytes(zeros) + struct.pack(">Q", self.length * 8)
        self._compress(self.state, self.tail)
        digest = struct.pack(">8I", *struct.unpack("=8I", self.state))
        self.state[:] = bytes(len(self.state))
        self.tail.clear()
        return digest


class HmacSha256:
    """RFC 2104 HMAC-SHA256: the inner stream starts after the key's ipad block, the outer
    hash of its digest is taken at the end. The key itself is not kept."""

    __slots__ = ("_outer", "inner")

    def __init__(self, compress: Any, key: bytes) -> None:
        if len(key) > BLOCK:
            key = _one_shot(compress, key)
        block = key.ljust(BLOCK, b"\0")
        self.inner = Sha256(compress)
        self.inner.update(bytes(b ^ 0x36 for b in block))
        self._outer = Sha256(compress)
        self._outer.update(bytes(b ^ 0x5C for b in block))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.inner.update(data)

    def finalize(self) -> bytes:
        self._outer.update(self.inner.finalize())
        return self._outer.finalize()


def _one_shot(compress: Any, data: bytes) -> bytes:
    stream = Sha256(compress)
    stream.update(data)
    return stream.finalize()


def update_pair(
    native_module: Any, first: Sha256, first_data: memoryview,
    second: Sha256, second_data: memoryview,
) -> None:
    """Feed two streams; the whole blocks both can take go through the C function at once."""
    first_data, second_data = memoryview(first_data).cast("B"), memoryview(second_data).cast("B")
    if first.spent or second.spent:
        raise ValueError("a finalized SHA-256 stream takes no more data")
    if not first.tail and not second.tail:
        whole = min(len(first_data), len(second_data))
        whole -= whole % BLOCK
        if whole:
            native_module.compress_pair(
                first.state, first_data[:whole], second.state, second_data[:whole]
            )
            first.length += whole
            second.length += whole
            first_data, second_data = first_data[whole:], second_data[whole:]
    first.update(first_data)
    second.update(second_data)


class MacAndDigest:
    """ocicrypt's HMAC-SHA256 over the ciphertext and the SHA-256 digest of the plaintext,
    fed a chunk of each at a time (usable as a SecondThread context)."""

    def __init__(self, native_module: Any, key: bytes) -> None:
        self._native = native_module
        self._mac = HmacSha256(native_module.compress, key)
        self._digest = Sha256(native_module.compress)

    def update(self, chunks: tuple[memoryview, memoryview]) -> None:
        """Feed (ciphertext, plaintext)."""
        ciphertext, plaintext = chunks
        update_pair(self._native, self._mac.inner, ciphertext, self._digest, plaintext)

    def finalize(self) -> tuple[bytes, bytes]:
        """(HMAC of the ciphertext, SHA-256 of the plaintext)."""
        return self._mac.finalize(), self._digest.finalize()


def mac_and_digest(key: bytes) -> MacAndDigest | None:
    """Paired contexts for this layer key, or None where the extension cannot run."""
    module = native()
    return None if module is None else MacAndDigest(module, key)

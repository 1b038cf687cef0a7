"""decoder.sha256pair and its C extension: known answers, agreement with hashlib and hmac
over random lengths and splits, and the extension's refusals of bad arguments."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from types import ModuleType

import pytest

from decoder import sha256pair
from tests.support import cpu_has_sha_extensions

KAT = json.loads((Path(__file__).parent / "assets" / "kat_sha256.json").read_text())


needs_native = pytest.mark.skipif(
    not cpu_has_sha_extensions(), reason="this CPU has no SHA extensions (sha_ni)"
)


def test_extension_is_built_and_used_exactly_where_the_cpu_can_run_it() -> None:
    # The development install compiles it (make installs gcc and the Python headers), so a
    # missing build shows here rather than as a quietly slower decoder.
    assert (sha256pair.native() is not None) == cpu_has_sha_extensions()


@pytest.fixture
def native() -> ModuleType:
    module = sha256pair.native()
    assert module is not None, "the CPU has SHA extensions but decoder._sha256pair is not built"
    return module


@needs_native
@pytest.mark.parametrize("vector", KAT["sha256"], ids=lambda v: v["digest"][:8])
def test_sha256_known_answers(native: ModuleType, vector: dict[str, object]) -> None:
    message = bytes.fromhex(str(vector["message_hex"])) * int(str(vector["repeat"]))
    stream = sha256pair.Sha256(native.compress)
    stream.update(message)
    assert stream.finalize().hex() == vector["digest"]


@needs_native
@pytest.mark.parametrize("vector", KAT["hmac_sha256"], ids=lambda v: v["mac"][:8])
def test_hmac_sha256_known_answers(native: ModuleType, vector: dict[str, str]) -> None:
    mac = sha256pair.HmacSha256(native.compress, bytes.fromhex(vector["key_hex"]))
    mac.update(bytes.fromhex(vector["data_hex"]))
    assert mac.finalize().hex() == vector["mac"]


def random_splits(rng: random.Random, data: bytes) -> list[memoryview]:
    view, pieces = memoryview(data), []
    while view:
        size = rng.choice([1, 63, 64, 65, 128, 1000, 4096, rng.randrange(1, 70000)])
        pieces.append(view[:size])
        view = view[size:]
    return pieces


@needs_native
def test_streams_agree_with_hashlib_and_hmac_over_random_lengths_and_splits(
    native: ModuleType,
) -> None:
    rng = random.Random(20261204)
    for _ in range(60):
        size = rng.choice([0, 1, 55, 56, 63, 64, 65, 119, 120, 128, rng.randrange(200000)])
        data = rng.randbytes(size)
        key = rng.randbytes(rng.choice([0, 1, 32, 64, 65, 100]))
        stream = sha256pair.Sha256(native.compress)
        mac = sha256pair.HmacSha256(native.compress, key)
        for piece in random_splits(rng, data):
            stream.update(piece)
            mac.update(piece)
        assert stream.finalize() == hashlib.sha256(data).digest()
        assert mac.finalize() == hmac.new(key, data, "sha256").digest()


@needs_native
def test_mac_and_digest_agree_with_hmac_and_hashlib_however_the_chunks_fall(
    native: ModuleType,
) -> None:
    rng = random.Random(4)
    key = rng.randbytes(32)
    for _ in range(40):
        size = rng.choice([0, 17, 64, 256 * 1024, rng.randrange(600000)])
        ciphertext, plaintext = rng.randbytes(size), rng.randbytes(size)
        paired = sha256pair.mac_and_digest(key)
        assert paired is not None
        c, p = memoryview(ciphertext), memoryview(plaintext)
        while c:
            # Mostly the same length for both, as the decoder feeds them; sometimes not, so
            # the streams' partial blocks differ and the pair must fall back block by block.
            step = rng.choice([64 * 1024, 256 * 1024, rng.randrange(1, 5000)])
            other = step if rng.random() < 0.7 else rng.randrange(1, 5000)
            paired.update((c[:step], p[:other]))
            c, p = c[step:], p[other:]
        if p:
            paired.update((c, p))
        assert paired.finalize() == (
            hmac.new(key, ciphertext, "sha256").digest(), hashlib.sha256(plaintext).digest()
        )


@needs_native
def test_pair_of_blocks_matches_two_single_streams(native: ModuleType) -> None:
    rng = random.Random(9)
    first_data, second_data = rng.randbytes(64 * 300), rng.randbytes(64 * 300)
    first, second = bytearray(sha256pair._INITIAL), bytearray(sha256pair._INITIAL)
    native.compress_pair(first, first_data, second, second_data)
    alone_first, alone_second = bytearray(sha256pair._INITIAL), bytearray(sha256pair._INITIAL)
    native.compress(alone_first, first_data)
    native.compress(alone_second, second_data)
    assert (first, second) == (alone_first, alone_second)
    assert first != second


@needs_native
@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((bytearray(31), b""), ValueError, "32 bytes"),
        ((bytearray(33), b""), ValueError, "32 bytes"),
        ((bytes(32), b""), (TypeError, BufferError), "writable"),
        ((bytearray(32), bytes(63)), ValueError, "whole 64-byte blocks"),
        ((bytearray(32), "not bytes"), TypeError, "bytes-like"),
        ((bytearray(32),), TypeError, "2 arguments"),
    ],
)
def test_compress_refuses_bad_arguments(
    native: ModuleType, arguments: tuple[object, ...],
    error: type[Exception] | tuple[type[Exception], ...], message: str,
) -> None:
    with pytest.raises(error, match=message):
        native.compress(*arguments)


@needs_native
def test_compress_pair_refuses_bad_arguments(native: ModuleType) -> None:
    state = bytearray(32)
    with pytest.raises(ValueError, match="same length"):
        native.compress_pair(state, bytes(64), bytearray(32), bytes(128))
    with pytest.raises(ValueError, match="two separate states"):
        native.compress_pair(state, bytes(64), state, bytes(64))
    overlapping = memoryview(bytearray(48))
    with pytest.raises(ValueError, match="two separate states"):
        native.compress_pair(overlapping[:32], bytes(64), overlapping[16:], bytes(64))
    with pytest.raises(ValueError, match="32 bytes"):
        native.compress_pair(state, bytes(64), bytearray(8), bytes(64))
    assert state == bytearray(32)  # nothing was compressed into it


@needs_native
def test_views_of_wider_items_are_hashed_as_their_bytes(native: ModuleType) -> None:
    data = bytes(range(256)) * 1000
    paired = sha256pair.mac_and_digest(b"k" * 32)
    assert paired is not None
    words = memoryview(data).cast("I")
    paired.update((words, memoryview(data).cast("d")))
    assert paired.finalize() == (
        hmac.new(b"k" * 32, data, "sha256").digest(), hashlib.sha256(data).digest()
    )


@needs_native
def test_a_finalized_stream_refuses_more(native: ModuleType) -> None:
    paired = sha256pair.mac_and_digest(bytes(32))
    assert paired is not None
    paired.update((memoryview(b"x" * 64), memoryview(b"y" * 64)))
    paired.finalize()
    with pytest.raises(ValueError, match="finalized"):
        paired.finalize()
    with pytest.raises(ValueError, match="finalized"):
        paired.update((memoryview(b"x" * 64), memoryview(b"y" * 64)))
    stream = sha256pair.Sha256(native.compress)
    stream.finalize()
    with pytest.raises(ValueError, match="finalized"):
        stream.update(b"more")

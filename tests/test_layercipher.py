"""Known-answer and streaming tests of AES_256_CTR_HMAC_SHA256 and its fail-closed release."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from decoder import layercipher, sha256pair
from decoder.errors import IntegrityError, LayerOptionsError, OutputError
from decoder.layercipher import (
    HOLD_BACK,
    TAR_BLOCK,
    CipherParameters,
    PrivateOptions,
    PublicOptions,
    cipher_parameters,
    decrypt_stream,
    parse_private_options,
    parse_public_options,
)
from tests.support import cpu_has_sha_extensions

KAT = json.loads((Path(__file__).parent / "assets" / "kat_aes_ctr_hmac.json").read_text())


@pytest.fixture(params=["sha256pair", "cryptography"])
def hashing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a decryption test with each way of hashing: the HMAC and digest together on the
    second thread (sha256pair), and cryptography's contexts, where the pair cannot run."""
    if request.param == "sha256pair":
        if not cpu_has_sha_extensions():
            pytest.skip("this CPU has no SHA extensions (sha_ni)")
        assert sha256pair.native() is not None
    else:
        monkeypatch.setattr(sha256pair, "mac_and_digest", lambda key: None)
    return str(request.param)


def kat_params() -> CipherParameters:
    private = parse_private_options(KAT["private_options"].encode())
    public = parse_public_options({"org.opencontainers.image.enc.pubopts": KAT["pubopts"]})
    return cipher_parameters(private, public)


def decrypt_bytes(
    params: CipherParameters, ciphertext: bytes, tmp_path: Path
) -> tuple[bytes, Exception | None]:
    src = tmp_path / "in"
    dst = tmp_path / "out"
    src.write_bytes(ciphertext)
    error = None
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            decrypt_stream(params, fin.fileno(), fout.fileno())
        except IntegrityError as e:
            error = e
    return dst.read_bytes(), error


@pytest.mark.usefixtures("hashing")
def test_known_answer_vector(tmp_path: Path) -> None:
    out, error = decrypt_bytes(kat_params(), bytes.fromhex(KAT["ciphertext_hex"]), tmp_path)
    assert error is None
    assert out == KAT["plaintext"].encode()


@pytest.mark.usefixtures("hashing")
def test_known_answer_empty_layer_hmac(tmp_path: Path) -> None:
    params = kat_params()
    empty = CipherParameters(
        params.key,
        params.nonce,
        bytes.fromhex(KAT["empty_hmac_hex"]),
        "sha256",
        hashlib.sha256(b"").digest(),
    )
    out, error = decrypt_bytes(empty, b"", tmp_path)
    assert (out, error) == (b"", None)


def make(plaintext: bytes, nonce: bytes | None = None) -> tuple[CipherParameters, bytes]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = os.urandom(32)
    iv = nonce or os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()
    mac = hmac.new(key, ciphertext, "sha256").digest()
    return CipherParameters(key, iv, mac, "sha256", hashlib.sha256(plaintext).digest()), ciphertext


@pytest.mark.usefixtures("hashing")
@pytest.mark.parametrize(
    "size",
    [
        1,
        511,
        512,
        513,
        HOLD_BACK,
        HOLD_BACK + 1,
        (1 << 20) - 1,
        1 << 20,
        (1 << 20) + 1,
        3 * (1 << 20) + 12345,
        (layercipher.RING + 2) * layercipher.RING_CHUNK + 12345,  # every ring slot reused
    ],
)
def test_round_trip_sizes(size: int, tmp_path: Path) -> None:
    plaintext = os.urandom(size)
    params, ciphertext = make(plaintext)
    out, error = decrypt_bytes(params, ciphertext, tmp_path)
    assert error is None
    assert out == plaintext


@pytest.mark.usefixtures("hashing")
def test_counter_carries_across_64_bit_halves(tmp_path: Path) -> None:
    # ocicrypt's CTR increments the whole 16-byte IV as one big-endian number.
    plaintext = os.urandom(4096)
    params, ciphertext = make(plaintext, nonce=bytes.fromhex("0000000000000000ffffffffffffffff"))
    out, error = decrypt_bytes(params, ciphertext, tmp_path)
    assert error is None and out == plaintext


@pytest.mark.usefixtures("hashing")
@pytest.mark.parametrize("damage", ["flip_middle", "flip_last", "truncate", "append"])
def test_tampered_ciphertext_never_yields_a_complete_layer(damage: str, tmp_path: Path) -> None:
    plaintext = os.urandom((layercipher.RING + 2) * layercipher.RING_CHUNK + 777)
    params, ciphertext = make(plaintext)
    data = bytearray(ciphertext)
    if damage == "flip_middle":
        data[len(data) // 2] ^= 1
    elif damage == "flip_last":
        data[-1] ^= 0x80
    elif damage == "truncate":
        del data[-1000:]
    else:
        data += b"\0"
    out, error = decrypt_bytes(params, bytes(data), tmp_path)
    assert isinstance(error, IntegrityError)
    assert "HMAC" in str(error) and params.expected_hmac.hex() in str(error)
    assert len(out) < len(plaintext) - HOLD_BACK + 1
    assert len(out) % TAR_BLOCK == 1, "a released prefix must end mid tar block"
    expected = bytearray(plaintext)
    if damage == "flip_middle":  # CTR: the flipped bit shows in the released prefix
        expected[len(expected) // 2] ^= 1
    assert bytes(expected).startswith(out)


@pytest.mark.usefixtures("hashing")
def test_digest_mismatch_withholds_tail(tmp_path: Path) -> None:
    plaintext = os.urandom(200_000)
    params, ciphertext = make(plaintext)
    wrong = CipherParameters(params.key, params.nonce, params.expected_hmac, "sha256", b"\0" * 32)
    out, error = decrypt_bytes(wrong, ciphertext, tmp_path)
    assert isinstance(error, IntegrityError)
    assert "does not match the sha256 digest" in str(error)
    assert hashlib.sha256(plaintext).hexdigest() not in str(error)
    assert len(out) < len(plaintext) and len(out) % TAR_BLOCK == 1


@pytest.mark.usefixtures("hashing")
def test_small_tampered_layer_writes_nothing(tmp_path: Path) -> None:
    params, ciphertext = make(b"a" * 5000)
    out, error = decrypt_bytes(params, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), tmp_path)
    assert isinstance(error, IntegrityError) and out == b""


@pytest.mark.usefixtures("hashing")
def test_failed_write_stops_the_hash_threads(tmp_path: Path) -> None:
    import threading

    plaintext = os.urandom(3 * layercipher.RING_CHUNK)
    params, ciphertext = make(plaintext)
    src = tmp_path / "in"
    src.write_bytes(ciphertext)
    threads_before = threading.active_count()
    writes = []

    def failing_write(fd: int, data: memoryview) -> None:
        writes.append(len(data))
        raise OutputError("the reader went away")

    with open(src, "rb") as fin, pytest.raises(OutputError, match="reader went away"):
        decrypt_stream(params, fin.fileno(), -1, write=failing_write)
    assert len(writes) == 1
    assert threading.active_count() == threads_before


def test_second_thread_feeds_in_order_and_stops_at_a_failure() -> None:
    data = [os.urandom(100_000 + i) for i in range(5)]
    worker = layercipher.SecondThread()
    first, second = layercipher.digest_context("sha256"), layercipher.digest_context("sha512")
    for chunk in data:
        worker.submit(((first, memoryview(chunk)), (second, memoryview(chunk))))
    worker.finish()
    assert first.finalize() == hashlib.sha256(b"".join(data)).digest()
    assert second.finalize() == hashlib.sha512(b"".join(data)).digest()

    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def update(self, data: memoryview) -> None:
            self.calls += 1
            if self.calls == 2:
                raise OutputError("hash failed")

    failing = Failing()
    worker = layercipher.SecondThread()
    for chunk in data:
        worker.submit(((failing, memoryview(chunk)),))
    with pytest.raises(OutputError, match="hash failed"):
        worker.wait_for(len(data))
    assert failing.calls == 2, "nothing is fed after a failure"
    worker.abandon()


@pytest.mark.usefixtures("hashing")
def test_decrypting_in_place_with_a_second_thread_is_refused() -> None:
    """With a hasher the HMAC runs after decryption, so in place it would cover plaintext."""
    params, ciphertext = make(os.urandom(1000))
    worker = layercipher.SecondThread()
    buffer = memoryview(bytearray(ciphertext + bytes(16)))
    with pytest.raises(ValueError, match="in place"):
        layercipher.LayerDecryptor(params).update_into(buffer[:1000], buffer, worker)
    worker.finish()
    separate = memoryview(bytearray(1016))
    decryptor = layercipher.LayerDecryptor(params)
    decryptor.update_into(memoryview(ciphertext), separate, (worker := layercipher.SecondThread()))
    worker.finish()
    assert decryptor.verify() is None


@pytest.mark.usefixtures("hashing")
@pytest.mark.parametrize("threaded", [False, True], ids=["same thread", "second thread"])
def test_layer_decryptor_in_chunks(threaded: bool) -> None:
    plaintext = os.urandom(300_001)
    params, ciphertext = make(plaintext)
    for expected_hmac, verifies in ((params.expected_hmac, True), (bytes(32), False)):
        decryptor = layercipher.LayerDecryptor(params._replace(expected_hmac=expected_hmac))
        worker = layercipher.SecondThread() if threaded else None
        out, buffers = bytearray(), []
        for start in range(0, len(ciphertext), 70_000):
            buffers.append(buffer := memoryview(bytearray(70_016)))  # in use until finish
            n = decryptor.update_into(memoryview(ciphertext)[start : start + 70_000], buffer,
                                      worker)
            out += buffer[:n]
        if worker is not None:
            worker.finish()
        assert out == plaintext and decryptor.bytes_processed == len(plaintext)
        if verifies:
            assert decryptor.verify() is None
            assert decryptor.plaintext_digest == "sha256:" + hashlib.sha256(plaintext).hexdigest()
        else:
            with pytest.raises(IntegrityError, match="failed its HMAC check"):
                decryptor.verify()


@pytest.mark.usefixtures("hashing")
def test_encrypt_stream_stops_its_second_thread_when_the_write_fails(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(3 * layercipher.CHUNK))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with open(src, "rb") as fin, pytest.raises(OutputError, match="closed the output pipe"):
            layercipher.encrypt_stream(fin.fileno(), write_end)
    finally:
        os.close(write_end)


def test_widen_pipe_grows_pipes_and_leaves_files_alone(tmp_path: Path) -> None:
    import fcntl

    read_end, write_end = os.pipe()
    try:
        before = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        layercipher.widen_pipe(write_end)
        after = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(read_end)
        os.close(write_end)
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert after == layercipher.PIPE_BYTES or (after == before and limit < layercipher.PIPE_BYTES)
    with open(tmp_path / "file", "wb") as regular:
        layercipher.widen_pipe(regular.fileno())  # not a pipe: silently nothing


def test_release_point_is_block_plus_one() -> None:
    for emitted, decrypted in [(0, HOLD_BACK + 5000), (1, HOLD_BACK + 9999), (513, 10 * HOLD_BACK)]:
        point = layercipher._release_point(emitted, decrypted)
        assert point >= emitted and point <= decrypted - HOLD_BACK
        assert point == emitted or point % TAR_BLOCK == 1
    assert layercipher._release_point(0, HOLD_BACK) == 0


@pytest.mark.usefixtures("hashing")
def test_a_truncated_multi_member_gzip_layer_is_not_a_complete_stream(tmp_path: Path) -> None:
    """estargz writes one gzip member per file: a release that ended where a member ends
    would be a whole, valid gzip stream of fewer files. It must stop short of that."""
    import gzip
    import zlib

    size = 9 * 1024 * 1024  # above FULL_HOLD, so the layer streams
    while True:  # a first member ending 1 byte past a 512-byte block, as releases do
        # Stored deflate blocks (level 0): each byte more of input is one more of output.
        first = gzip.compress(os.urandom(size), compresslevel=0, mtime=0)
        if not (short := (1 - len(first)) % TAR_BLOCK):
            break
        size += short
    second = gzip.compress(os.urandom(300_000), compresslevel=1, mtime=0)
    plaintext = first + second
    params, ciphertext = make(plaintext)
    cut = len(first) + HOLD_BACK + 100  # the release point falls on the member boundary
    out, error = decrypt_bytes(params, ciphertext[:cut], tmp_path)
    assert isinstance(error, IntegrityError)
    assert 0 < len(out) < len(first) and plaintext.startswith(out)
    with pytest.raises((EOFError, zlib.error, OSError)):
        gzip.decompress(out)


@pytest.mark.parametrize(
    "magic", [b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd", b"\x5a\x2a\x4d\x18"]
)
def test_release_point_steps_back_from_a_gzip_member_or_zstd_frame(magic: bytes) -> None:
    decrypted = 3 * HOLD_BACK
    natural = layercipher._release_point(0, decrypted)
    data = bytearray(os.urandom(decrypted))
    data[natural : natural + 4] = magic
    point = layercipher._release_point(0, decrypted, None, [memoryview(data)])
    assert point == natural - 2 and point % TAR_BLOCK == TAR_BLOCK - 1
    # the same bytes split across two views, the magic straddling them
    views = [memoryview(data)[: natural + 1], memoryview(data)[natural + 1 :]]
    assert layercipher._release_point(0, decrypted, None, views) == natural - 2
    # from an offset: pending starts at what was emitted
    assert layercipher._release_point(1000, decrypted, None, [memoryview(data)[1000:]]) == (
        natural - 2)


def options(**changes: object) -> tuple[PrivateOptions, PublicOptions]:
    private = PrivateOptions(os.urandom(32), "sha256:" + "ab" * 32, {"nonce": os.urandom(16)})
    public = PublicOptions("AES_256_CTR_HMAC_SHA256", os.urandom(32), {})
    for name, value in changes.items():
        target, field = name.split("_", 1)
        if target == "priv":
            private = private._replace(**{field: value})
        else:
            public = public._replace(**{field: value})
    return private, public


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"priv_cipher_options": {}}, "carry no nonce"),
        ({"priv_cipher_options": {"nonce": b"short"}}, "nonce is 5 bytes"),
        ({"priv_cipher_options": {"nonce": None}}, "carry no nonce"),
        ({"priv_symkey": b"k" * 16}, "key is 16 bytes"),
        ({"priv_symkey": b""}, "key is 0 bytes"),
        ({"pub_cipher": ""}, "name no cipher"),
        ({"pub_cipher": "AES_128_GCM"}, "uses cipher 'AES_128_GCM'"),
        ({"pub_hmac": None}, "carry no HMAC"),
        ({"pub_hmac": b"x" * 20}, "HMAC is 20 bytes"),
        ({"priv_digest": ""}, "no plaintext digest"),
        ({"priv_digest": "md5:abcd"}, "not a sha256, sha384 or sha512 digest"),
        ({"priv_digest": "SHA256:" + "ab" * 32}, "not a sha256, sha384 or sha512 digest"),
        ({"priv_digest": "sha256:" + "zz" * 32}, "not 64 hex digits"),
        ({"priv_digest": "sha256:" + "ab " * 21 + "a"}, "not 64 hex digits"),
        ({"priv_digest": "sha384:" + "ab" * 32}, "not 96 hex digits"),
    ],
)
def test_bad_options_are_refused(changes: dict[str, object], message: str) -> None:
    private, public = options(**changes)
    with pytest.raises(LayerOptionsError, match=message) as refused:
        cipher_parameters(private, public)
    digest = str(changes.get("priv_digest", ""))
    if len(digest) > 8:  # the wrapped digest is confidential: never in a message
        assert digest.partition(":")[2] not in str(refused.value)


def test_unauthenticated_public_nonce_cannot_override_private() -> None:
    private, public = options()
    public = PublicOptions(public.cipher, public.hmac, {"nonce": b"P" * 16})
    with pytest.raises(LayerOptionsError, match="differs from its private one"):
        cipher_parameters(private, public)
    same = PublicOptions(public.cipher, public.hmac, dict(private.cipher_options))
    assert cipher_parameters(private, same).nonce == private.cipher_options["nonce"]
    private_without = PrivateOptions(private.symkey, private.digest, {})
    assert cipher_parameters(private_without, public).nonce == b"P" * 16


@pytest.mark.usefixtures("hashing")
def test_hmac_failure_does_not_reveal_the_computed_mac(tmp_path: Path) -> None:
    # HMAC(layer key, chosen ciphertext) in an error would let the sender forge the layer.
    plaintext = os.urandom(5000)
    params, ciphertext = make(plaintext)
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    computed = hmac.new(params.key, tampered, "sha256").hexdigest()
    _, error = decrypt_bytes(params, tampered, tmp_path)
    assert isinstance(error, IntegrityError) and computed not in str(error)


@pytest.mark.usefixtures("hashing")
def test_appended_bytes_cannot_push_the_real_end_out(tmp_path: Path) -> None:
    plaintext = os.urandom(300_000)
    params, ciphertext = make(plaintext)
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(ciphertext + os.urandom(200_000))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        with pytest.raises(IntegrityError, match="more than the 300000 bytes"):
            decrypt_stream(params, fin.fileno(), fout.fileno(), expected_size=len(ciphertext))
    out = dst.read_bytes()
    assert len(out) <= len(plaintext) - HOLD_BACK
    assert out == b"" or len(out) % TAR_BLOCK == 1


@pytest.mark.parametrize("hashing", ["sha256pair", "cryptography"], indirect=True)
@pytest.mark.parametrize("mode", ["held whole", "streamed", "spooled"])
@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("tampered", [False, True], ids=["good", "tampered"])
def test_every_way_of_decrypting_agrees(
    hashing: str, mode: str, algorithm: str, tampered: bool, tmp_path: Path
) -> None:
    # Both ways of hashing, in each of decrypt_stream's three arrangements of buffers, give
    # the plaintext of a good layer and refuse a tampered one.
    plaintext = os.urandom(3 * layercipher.RING_CHUNK + 777)
    params, ciphertext = make(plaintext)
    params = params._replace(
        digest_algorithm=algorithm, expected_digest=hashlib.new(algorithm, plaintext).digest()
    )
    if tampered:
        ciphertext = ciphertext[:5000] + bytes([ciphertext[5000] ^ 4]) + ciphertext[5001:]
    src, dst, spool = tmp_path / "in", tmp_path / "out", tmp_path / "spool"
    src.write_bytes(ciphertext)
    with open(src, "rb") as fin, open(dst, "wb") as fout, open(spool, "w+b") as spooled:
        call = lambda: decrypt_stream(  # noqa: E731
            params, fin.fileno(), fout.fileno(),
            expected_size=len(ciphertext) if mode == "held whole" else None,
            spool_fd=spooled.fileno() if mode == "spooled" else None,
        )
        if tampered:
            with pytest.raises(IntegrityError, match="failed its HMAC check"):
                call()
        else:
            assert call() is None
    out = dst.read_bytes()
    if not tampered:
        assert out == plaintext
    elif mode == "streamed":
        assert 0 < len(out) <= len(plaintext) - HOLD_BACK
    else:
        assert out == b""


@pytest.mark.parametrize("hashing", ["sha256pair", "cryptography"], indirect=True)
@pytest.mark.parametrize("mode", ["held whole", "streamed", "spooled"])
def test_no_buffer_is_reused_while_the_second_thread_hashes_it(
    hashing: str, mode: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A slow second thread: what it hashes must be what was submitted, until it is done.
    import time

    changed: list[int] = []

    def snapshot(data: object) -> bytes:
        views = data if isinstance(data, tuple) else (data,)
        return hashlib.sha256(b"".join(bytes(v) for v in views)).digest()

    class Slow:
        def __init__(self, context: object, data: object, index: int) -> None:
            self.context, self.taken, self.index = context, snapshot(data), index

        def update(self, data: object) -> None:
            time.sleep(0.003)
            unchanged = snapshot(data) == self.taken
            self.context.update(data)  # type: ignore[attr-defined]
            if not (unchanged and snapshot(data) == self.taken):
                changed.append(self.index)

    real_submit = layercipher.SecondThread.submit

    def submit(self: layercipher.SecondThread, updates: layercipher.Updates,
               writes: tuple[memoryview, ...] = ()) -> None:
        slowed = tuple((Slow(c, d, self.submitted), d) for c, d in updates)
        real_submit(self, slowed, writes)

    monkeypatch.setattr(layercipher.SecondThread, "submit", submit)
    plaintext = os.urandom((layercipher.RING + 3) * layercipher.RING_CHUNK + 1234)
    params, ciphertext = make(plaintext)
    src, dst, spool = tmp_path / "in", tmp_path / "out", tmp_path / "spool"
    src.write_bytes(ciphertext)
    with open(src, "rb") as fin, open(dst, "wb") as fout, open(spool, "w+b") as spooled:
        assert decrypt_stream(
            params, fin.fileno(), fout.fileno(),
            expected_size=len(ciphertext) if mode == "held whole" else None,
            spool_fd=spooled.fileno() if mode == "spooled" else None,
        ) is None
    assert changed == []
    assert dst.read_bytes() == plaintext


@pytest.mark.skipif(not cpu_has_sha_extensions(), reason="this CPU has no SHA extensions")
def test_the_pair_hashes_a_sha256_layer_and_cryptography_any_other(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    made: list[object] = []
    real = sha256pair.mac_and_digest

    def spy(key: bytes) -> sha256pair.MacAndDigest | None:
        result = real(key)
        made.append(result)
        return result

    monkeypatch.setattr(sha256pair, "mac_and_digest", spy)
    plaintext = os.urandom(1 << 20)
    params, ciphertext = make(plaintext)
    assert decrypt_bytes(params, ciphertext, tmp_path) == (plaintext, None)
    assert len(made) == 1 and isinstance(made[0], sha256pair.MacAndDigest)
    sha512 = params._replace(digest_algorithm="sha512",
                             expected_digest=hashlib.sha512(plaintext).digest())
    assert decrypt_bytes(sha512, ciphertext, tmp_path) == (plaintext, None)
    assert len(made) == 1, "a sha512 digest is not one the pair computes"
    small_plaintext = os.urandom(30_000)
    small, small_ciphertext = make(small_plaintext)
    src, dst = tmp_path / "small", tmp_path / "small.out"
    src.write_bytes(small_ciphertext)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        decrypt_stream(small, fin.fileno(), fout.fileno(), expected_size=len(small_ciphertext))
    assert dst.read_bytes() == small_plaintext
    assert len(made) == 1, "a layer of one chunk does not load the pair"


def test_options_json_go_semantics() -> None:
    opts = parse_private_options(
        b'{"SymKey": [1,2,3], "DIGEST": "sha256:00", "cipherOptions": {"nonce": "AAEC"}}'
    )
    assert opts.symkey == b"\x01\x02\x03"
    assert opts.digest == "sha256:00"
    assert opts.cipher_options == {"nonce": b"\x00\x01\x02"}


@pytest.mark.parametrize("value", ["", "!!!", "bm90IGpzb24="])
def test_bad_pubopts_annotation(value: str) -> None:
    with pytest.raises(LayerOptionsError, match="pubopts"):
        parse_public_options({"org.opencontainers.image.enc.pubopts": value})


@pytest.mark.usefixtures("hashing")
def test_encrypt_stream_round_trips_and_matches_ocicrypt_shapes(tmp_path: Path) -> None:
    plaintext = os.urandom(2 * (1 << 20) + 99)
    src, enc = tmp_path / "plain", tmp_path / "enc"
    src.write_bytes(plaintext)
    with open(src, "rb") as fin, open(enc, "wb") as fout:
        result = layercipher.encrypt_stream(fin.fileno(), fout.fileno())
    ciphertext = enc.read_bytes()
    assert result.size == len(plaintext) == len(ciphertext)
    assert result.plaintext_digest == "sha256:" + hashlib.sha256(plaintext).hexdigest()
    assert result.ciphertext_digest == "sha256:" + hashlib.sha256(ciphertext).hexdigest()
    private = json.loads(result.private_options)
    public = json.loads(result.public_options)
    assert list(private) == ["symkey", "digest", "cipheroptions"]
    assert list(public) == ["cipher", "hmac", "cipheroptions"] and public["cipheroptions"] == {}
    pubopts = base64.b64encode(result.public_options).decode()
    params = cipher_parameters(
        parse_private_options(result.private_options),
        parse_public_options({"org.opencontainers.image.enc.pubopts": pubopts}),
    )
    # Checked with the standard library too: encryption and decryption share the pair.
    assert hmac.new(params.key, ciphertext, "sha256").digest() == params.expected_hmac
    out, error = decrypt_bytes(params, ciphertext, tmp_path)
    assert error is None and out == plaintext


@pytest.mark.usefixtures("hashing")
def test_encrypt_stream_refuses_a_source_that_does_not_match_its_digest(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    src.write_bytes(b"layer")
    with open(src, "rb") as fin, open(tmp_path / "enc", "wb") as fout:
        with pytest.raises(IntegrityError, match="not the sha256:00"):
            layercipher.encrypt_stream(fin.fileno(), fout.fileno(), "sha256:00")

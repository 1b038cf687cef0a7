"""ocicrypt's layer cipher, AES_256_CTR_HMAC_SHA256, and its options.

The layer is AES-256 in CTR mode (the 16-byte nonce is the initial counter block,
incremented as one 128-bit big-endian number), then HMAC-SHA256 over the whole ciphertext
with the same 32-byte key (encrypt-then-MAC). The private options (symkey, digest of the
plaintext blob, nonce) travel wrapped; the public options (cipher, hmac) in the pubopts
annotation.

Decryption fails closed. A layer of at most FULL_HOLD bytes goes out only after both the
HMAC and the plaintext digest have verified. A larger one is released while at least
HOLD_BACK bytes stay held back, every release ending one byte past a 512-byte boundary and
never where a gzip member or zstd frame begins, so a truncated or corrupted layer never gets
out as a whole tar, gzip or zstd stream (multi-member ones, as estargz and zstd:chunked
write, included); its tail goes out only after both checks. CTR is malleable, though:
someone who knows a layer's plaintext can flip the ciphertext so that the released prefix is
a stream of their choosing, which only the failed HMAC (exit status 1) reveals. With a
spool file nothing goes out before both checks, whatever the size.
"""

from __future__ import annotations

import binascii
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from decoder import gojson
from decoder.errors import IntegrityError, LayerOptionsError, OutputError
from decoder.spec import CIPHER_AES_256_CTR_HMAC_SHA256, PUBOPTS_ANNOTATION

KEY_BYTES = 32
NONCE_BYTES = 16
HMAC_BYTES = 32
CHUNK = 1 << 20
HOLD_BACK = 64 * 1024
FULL_HOLD = 8 * 1024 * 1024  # layers up to this size are held whole, in memory
TAR_BLOCK = 512
_DIGESTS = {"sha256": 64, "sha384": 96, "sha512": 128}


class PrivateOptions(NamedTuple):
    """The wrapped half: the layer key, the plaintext digest, private cipher options."""

    symkey: bytes
    digest: str
    cipher_options: dict[str, bytes | None]


class PublicOptions(NamedTuple):
    """The pubopts annotation: cipher name, HMAC of the ciphertext, public cipher options."""

    cipher: str
    hmac: bytes | None
    cipher_options: dict[str, bytes | None]


def _cipher_options(value: Any) -> dict[str, bytes | None]:
    return {k: gojson.as_bytes(v) for k, v in gojson.items(value)}


def parse_private_options(data: bytes) -> PrivateOptions:
    """Read ocicrypt's PrivateLayerBlockCipherOptions JSON (Go field matching)."""
    try:
        obj = gojson.loads(data)
        return PrivateOptions(
            symkey=gojson.as_bytes(gojson.field(obj, "symkey")) or b"",
            digest=gojson.as_str(gojson.field(obj, "digest")),
            cipher_options=_cipher_options(gojson.field(obj, "cipheroptions")),
        )
    except gojson.GoJSONError as e:
        raise LayerOptionsError(f"the unwrapped private layer options are malformed: {e}") from e


def parse_public_options(annotations: dict[str, str]) -> PublicOptions:
    """Read the pubopts annotation (base64 of PublicLayerBlockCipherOptions JSON)."""
    value = annotations.get(PUBOPTS_ANNOTATION)
    if not value:
        raise LayerOptionsError(
            f"the layer has no {PUBOPTS_ANNOTATION} annotation, so its cipher and HMAC are unknown"
        )
    try:
        raw = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise LayerOptionsError(f"the {PUBOPTS_ANNOTATION} annotation is not valid base64") from e
    try:
        obj = gojson.loads(raw)
        return PublicOptions(
            cipher=gojson.as_str(gojson.field(obj, "cipher")),
            hmac=gojson.as_bytes(gojson.field(obj, "hmac")),
            cipher_options=_cipher_options(gojson.field(obj, "cipheroptions")),
        )
    except gojson.GoJSONError as e:
        raise LayerOptionsError(f"the {PUBOPTS_ANNOTATION} annotation is malformed: {e}") from e


def check_public_options(public: PublicOptions) -> bytes:
    """Refuse unusable public options before any key is touched; return the expected HMAC."""
    if not public.cipher:
        raise LayerOptionsError("the layer's public options name no cipher")
    if public.cipher != CIPHER_AES_256_CTR_HMAC_SHA256:
        raise LayerOptionsError(
            f"the layer uses cipher {public.cipher!r}; only {CIPHER_AES_256_CTR_HMAC_SHA256} exists"
        )
    if not public.hmac:
        raise LayerOptionsError(
            "the layer's public options carry no HMAC, so it cannot be verified"
        )
    if len(public.hmac) != HMAC_BYTES:
        raise LayerOptionsError(
            f"the layer's HMAC is {len(public.hmac)} bytes; HMAC-SHA256 is {HMAC_BYTES}"
        )
    return public.hmac


class CipherParameters(NamedTuple):
    """Everything needed to decrypt and verify one layer."""

    key: bytes
    nonce: bytes
    expected_hmac: bytes
    digest_algorithm: str
    expected_digest: bytes


def cipher_parameters(private: PrivateOptions, public: PublicOptions) -> CipherParameters:
    """Validate the unwrapped options against the cipher's needs."""
    expected_hmac = check_public_options(public)
    if len(private.symkey) != KEY_BYTES:
        raise LayerOptionsError(
            f"the layer key is {len(private.symkey)} bytes; AES-256 needs {KEY_BYTES}"
        )
    # ocicrypt writes the nonce into the private options, which the key wrap authenticates;
    # it reads public first, but a public nonce is unauthenticated, so it only fills a gap.
    private_nonce = private.cipher_options.get("nonce")
    public_nonce = public.cipher_options.get("nonce")
    if private_nonce and public_nonce and private_nonce != public_nonce:
        raise LayerOptionsError(
            "the layer's public options carry a nonce that differs from its private one"
        )
    nonce = private_nonce or public_nonce
    if not nonce:
        raise LayerOptionsError("the layer's cipher options carry no nonce")
    if len(nonce) != NONCE_BYTES:
        raise LayerOptionsError(
            f"the layer's nonce is {len(nonce)} bytes; AES-CTR needs {NONCE_BYTES}"
        )
    # The digest itself is confidential (wrapped): messages say what is wrong, never its value.
    algorithm, _, hex_digest = private.digest.partition(":")
    if not private.digest:
        raise LayerOptionsError(
            "the layer's private options carry no plaintext digest to verify the result against"
        )
    if algorithm not in _DIGESTS:
        raise LayerOptionsError(
            "the layer's plaintext digest (in its private options) is not a sha256, sha384 or "
            "sha512 digest"
        )
    try:
        expected_digest = bytes.fromhex(hex_digest)
    except ValueError:
        expected_digest = b""
    if len(hex_digest) != _DIGESTS[algorithm] or len(expected_digest) * 2 != len(hex_digest):
        raise LayerOptionsError(
            f"the layer's {algorithm} plaintext digest (in its private options) is not "
            f"{_DIGESTS[algorithm]} hex digits"
        )
    return CipherParameters(private.symkey, nonce, expected_hmac, algorithm, expected_digest)


def digest_context(algorithm: str) -> Any:
    """A cryptography hash context for "sha256", "sha384" or "sha512". The decoder hashes with
    cryptography, already loaded for AES, rather than hashlib, whose OpenSSL is a second
    libcrypto to load on every start; both release the GIL on large updates."""
    from cryptography.hazmat.primitives import hashes

    kinds: dict[str, Callable[[], hashes.HashAlgorithm]] = {
        "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
    }
    return hashes.Hash(kinds[algorithm]())


def mac_context(key: bytes) -> Any:
    """ocicrypt's HMAC-SHA256 over the ciphertext, keyed with the layer key."""
    from cryptography.hazmat.primitives import hashes, hmac

    return hmac.HMAC(key, hashes.SHA256())


def same_bytes(a: bytes, b: bytes) -> bool:
    """Constant-time comparison (hmac.compare_digest without importing hashlib)."""
    from _operator import _compare_digest

    return bool(_compare_digest(a, b))


def paired_hashes(params: CipherParameters) -> Any:
    """The HMAC and a sha256 digest computed together (a sha256pair.MacAndDigest), or None
    where the pair cannot run or the digest is another algorithm."""
    if params.digest_algorithm != "sha256":
        return None
    from decoder import sha256pair

    return sha256pair.mac_and_digest(params.key)


class LayerDecryptor:
    """Streaming AES-256-CTR decryption with HMAC-SHA256 over the ciphertext and a digest
    over the plaintext, shaped like cryptography's cipher contexts."""

    def __init__(self, params: CipherParameters) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._params = params
        self._ctr = Cipher(algorithms.AES(params.key), modes.CTR(params.nonce)).decryptor()
        self._pair = paired_hashes(params)
        if self._pair is None:
            self._mac = mac_context(params.key)
            self._digest = digest_context(params.digest_algorithm)
        self._final: tuple[bytes, bytes] | None = None
        self.bytes_processed = 0

    def update_into(
        self, ciphertext: memoryview, out: memoryview, hasher: SecondThread | None = None
    ) -> int:
        """Decrypt `ciphertext` into `out` (at least len(ciphertext) + 15 bytes long). With
        `hasher`, the HMAC and digest updates go to that thread: both buffers stay in use
        until it has done this submission, and it must have finished before the results are
        read. `out` must be another buffer when the HMAC runs after decryption (with a
        hasher, or with the paired hashes), since in place it would cover the plaintext."""
        if (hasher is not None or self._pair is not None) and out.obj is ciphertext.obj:
            raise ValueError("update_into cannot decrypt in place here: the HMAC runs after it")
        if hasher is None and self._pair is None:
            self._mac.update(ciphertext)  # before decrypting, which may be in place
        n = self._ctr.update_into(ciphertext, out)
        plaintext = out[:n]
        updates: Updates
        if self._pair is not None:
            updates = ((self._pair, (ciphertext, plaintext)),)
        elif hasher is not None:
            updates = ((self._mac, ciphertext), (self._digest, plaintext))
        else:
            updates = ((self._digest, plaintext),)
        if hasher is not None:
            hasher.submit(updates)
        else:
            for context, data in updates:
                context.update(data)
        self.bytes_processed += n
        return n

    def _finish(self) -> tuple[bytes, bytes]:
        final = self._final
        if final is None:
            if self._pair is not None:
                final = self._pair.finalize()
            else:
                final = (self._mac.finalize(), self._digest.finalize())
            self._final = final
        return final

    @property
    def plaintext_digest(self) -> str:
        """The digest of the whole plaintext, as "algorithm:hex" (ends the stream)."""
        return f"{self._params.digest_algorithm}:{self._finish()[1].hex()}"

    def verify(self, accept_digest_mismatch: bool = False) -> str | None:
        """Raise IntegrityError unless the HMAC and the plaintext digest both match. With
        accept_digest_mismatch, a digest mismatch after a good HMAC is returned as a warning.
        Ends the stream."""
        mac, digest = self._finish()
        return verify(self._params, mac, digest, accept_digest_mismatch,
                      NOTHING_WRITTEN)


WITHHELD = "the end of the plaintext was withheld"
NOTHING_WRITTEN = "nothing was written"


def verify(
    params: CipherParameters, mac: bytes, digest: bytes, accept_digest_mismatch: bool = False,
    withheld: str = WITHHELD,
) -> str | None:
    """Check a computed HMAC and plaintext digest against the layer's: raise IntegrityError,
    or return a warning when a digest mismatch after a good HMAC is accepted. `withheld` says
    what became of the plaintext, for the error."""
    # Neither the computed HMAC nor the digests are shown: the HMAC of chosen ciphertext
    # under the layer key would let its sender forge a layer, and the plaintext digest is
    # part of the wrapped, confidential options.
    if not same_bytes(mac, params.expected_hmac):
        raise IntegrityError(
            "the layer failed its HMAC check (tampered, truncated or not this layer's "
            f"ciphertext; expected HMAC {params.expected_hmac.hex()}); {withheld}"
        )
    if same_bytes(digest, params.expected_digest):
        return None
    mismatch = (
        f"the decrypted layer does not match the {params.digest_algorithm} digest "
        "recorded in its private options"
    )
    if accept_digest_mismatch:
        return f"{mismatch}; accepted because the HMAC verified (--accept-digest-mismatch)"
    raise IntegrityError(
        f"{mismatch}; {withheld}. The HMAC verified, so the "
        "ciphertext is what its producer encrypted: skopeo records the source blob's digest "
        "when it recompresses a layer while encrypting (uncompressed or docker-archive "
        "sources, --dest-compress-format). Re-encrypt without recompressing, or start "
        "ctd-decoder with --accept-digest-mismatch to trust the HMAC alone"
    )


def wait_until_ready(fd: int, for_writing: bool) -> None:
    """Block until a non-blocking fd (O_NONBLOCK set by whoever opened it) can be read or
    written: EAGAIN is a wait, not an error."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLOUT if for_writing else select.POLLIN)
    poller.poll()


def write_all(fd: int, data: memoryview, what: str = "the plaintext") -> None:
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            wait_until_ready(fd, for_writing=True)
            continue
        except BrokenPipeError as e:
            raise OutputError(
                "the reader closed the output pipe before the layer was written"
            ) from e
        except OSError as e:
            raise OutputError(f"cannot write {what}: {e.strerror}") from e
        data = data[written:]


def _release_point(
    emitted: int, decrypted: int, expected_size: int | None = None,
    pending: Sequence[memoryview] = (),
) -> int:
    """How far plaintext may go out: HOLD_BACK kept before the end (the descriptor's size
    when known, so appended bytes cannot push the real end out early), ending 1 byte past a
    512-byte block, and not where the held-back bytes (`pending`, from `emitted` on) start a
    gzip member or zstd frame: the prefix must not be a complete multi-member stream."""
    end = decrypted if expected_size is None else min(decrypted, expected_size)
    limit = end - HOLD_BACK
    if limit <= emitted:
        return emitted
    limit = max(emitted, limit - (limit - 1) % TAR_BLOCK)
    if limit > emitted and _starts_a_stream(_peek(pending, limit - emitted, 4)):
        # 2 bytes back: 511 past a block boundary, still inside a tar block, and no member
        # or frame can start there too (no two of these magics overlap that way).
        limit = max(emitted, limit - 2)
    return limit


GZIP_MEMBER = b"\x1f\x8b\x08"  # ID1 ID2 CM=deflate (RFC 1952)
ZSTD_FRAME = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528 little-endian (RFC 8878)
ZSTD_SKIPPABLE_TAIL = b"\x2a\x4d\x18"  # 0x184D2A5? little-endian: a skippable frame


def _starts_a_stream(head: bytes) -> bool:
    return (head.startswith(GZIP_MEMBER) or head == ZSTD_FRAME
            or (len(head) == 4 and head[0] & 0xF0 == 0x50 and head[1:] == ZSTD_SKIPPABLE_TAIL))


def _peek(pending: Sequence[memoryview], offset: int, count: int) -> bytes:
    """Up to `count` bytes from `offset` into the concatenation of `pending`."""
    out = b""
    for view in pending:
        if offset >= len(view):
            offset -= len(view)
            continue
        out += bytes(view[offset : offset + count - len(out)])
        offset = 0
        if len(out) == count:
            break
    return out


# (hash or HMAC context, what its update takes: bytes, or a MacAndDigest's two chunks)
Updates = tuple[tuple[Any, memoryview | tuple[memoryview, memoryview]], ...]


class SecondThread:
    """The second core's worker: feeds chunks to hash contexts, then writes chunks to an fd,
    one submission after another in order. In the decoder it computes the HMAC and digest
    together (sha256pair) while the main thread reads, decrypts and writes; without the pair,
    the main thread reads, MACs and decrypts and this one digests and writes, about the same
    work each. The encoder gives it two of its three hashes. cryptography and sha256pair
    release the GIL while they hash a large buffer, and os.write while it writes, so the two
    threads run in parallel; AES-CTR holds it, so it stays on the main thread."""

    def __init__(
        self, out_fd: int = -1, write: Callable[[int, memoryview], None] = write_all
    ) -> None:
        import _thread  # not threading: its imports cost a start-up a millisecond
        from _queue import SimpleQueue  # queue.SimpleQueue, without queue's other imports

        self._out_fd = out_fd
        self._write = write
        self._todo: SimpleQueue[tuple[Updates, Sequence[memoryview]] | None] = SimpleQueue()
        self._done: SimpleQueue[int] = SimpleQueue()
        self._error: BaseException | None = None
        self._stopped = False
        self.submitted = 0
        self.completed = 0
        self._running = _thread.allocate_lock()
        self._running.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            while (item := self._todo.get()) is not None:
                if self._error is None and not self._stopped:
                    try:
                        updates, writes = item
                        for context, data in updates:
                            context.update(data)
                        for view in writes:
                            self._write(self._out_fd, view)
                    except BaseException as e:  # re-raised by the main thread
                        self._error = e
                self._done.put(1)
        finally:
            self._running.release()

    def submit(self, updates: Updates, writes: Sequence[memoryview] = ()) -> None:
        """Feed each (context, data) of `updates`, then write `writes`, after all earlier
        submissions. The buffers stay in use until wait_for says this one is done."""
        self._todo.put((updates, writes))
        self.submitted += 1

    def wait_for(self, count: int) -> None:
        """Block until the first `count` submissions are done (their buffers are free);
        raise what the thread hit, such as a closed output pipe."""
        while self.completed < count:
            self.completed += self._done.get()
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait for every submission and end the thread; raise what it hit."""
        self._todo.put(None)
        self._join()
        if self._error is not None:
            raise self._error

    def _join(self) -> None:
        self._running.acquire()
        self._running.release()

    def abandon(self) -> None:
        """Stop without feeding or writing anything more (the main thread failed)."""
        self._stopped = True
        self._todo.put(None)
        self._join()


RING = 8  # chunk buffers: one being read and decrypted, the rest queued for the second thread
RING_CHUNK = 256 * 1024  # each chunk stays in the core's cache between its read and its MAC
ENCRYPT_SLOTS = 2  # encoder: the chunk being worked on, and the one the second thread hashes
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


def widen_pipe(fd: int) -> None:
    """Grow a pipe's buffer from 64 KiB to PIPE_BYTES, so writer and reader wake each other
    a sixteenth as often (0.42 s -> 0.27 s for 256 MiB into `cat`); a no-op for files, and
    when not allowed."""
    import fcntl

    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if get_size is None or set_size is None or fd < 0:
        return
    try:
        if fcntl.fcntl(fd, get_size) < PIPE_BYTES:
            fcntl.fcntl(fd, set_size, PIPE_BYTES)
    except OSError:  # not a pipe (EBADF, EINVAL), or over the user's pipe quota (EPERM)
        pass


def _read_full(fd: int, view: memoryview) -> int:
    filled = 0
    while filled < len(view):
        try:
            n = os.readv(fd, [view[filled:]])
        except BlockingIOError:
            wait_until_ready(fd, for_writing=False)
            continue
        except OSError as e:
            raise OutputError(f"cannot read the ciphertext from stdin: {e.strerror}") from e
        if n == 0:
            break
        filled += n
    return filled


def decrypt_stream(
    params: CipherParameters,
    in_fd: int,
    out_fd: int,
    expected_size: int | None = None,
    accept_digest_mismatch: bool = False,
    write: Callable[[int, memoryview], None] = write_all,
    spool_fd: int | None = None,
) -> str | None:
    """Decrypt in_fd to out_fd in constant memory (RING chunks); return a warning, if any.

    A layer whose descriptor size is at most FULL_HOLD is decrypted into memory and written
    only once verified. With spool_fd (an empty file open for reading and writing), the
    plaintext goes there and is copied to out_fd once verified.

    Where decoder.sha256pair can run, the second thread computes the HMAC and the sha256
    digest together and the main thread reads, decrypts (out of place: the HMAC is over the
    ciphertext) and writes. Elsewhere the main thread reads, MACs and decrypts in place, and
    the second thread digests and writes."""
    from collections import deque

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ctr = Cipher(algorithms.AES(params.key), modes.CTR(params.nonce)).decryptor()
    # A layer of one chunk gains nothing from the pair, so it skips loading it (~1 ms).
    small = expected_size is not None and expected_size <= RING_CHUNK
    paired = None if small else paired_hashes(params)
    mac: Any = None  # cryptography's contexts, where the pair cannot run
    digest_hash: Any = None
    if paired is None:
        mac = mac_context(params.key)
        digest_hash = digest_context(params.digest_algorithm)
    sink_fd, sink = (out_fd, write) if spool_fd is None else (spool_fd, _spool_write)
    hasher = SecondThread() if paired is not None else SecondThread(sink_fd, sink)
    whole: memoryview | None = None  # the layer held in memory, when it is small
    if spool_fd is None and expected_size is not None and expected_size <= FULL_HOLD:
        whole = memoryview(bytearray(expected_size + 16))
    withheld = WITHHELD if whole is None and spool_fd is None else NOTHING_WRITTEN
    slots: list[memoryview] = []  # grown to RING buffers only as the layer needs them
    plain_slots: list[memoryview] = []  # paired only: where each slot's chunk is decrypted to
    pending: deque[memoryview] = deque()  # decrypted, not yet released, in order
    decrypted = emitted = chunks = 0
    try:
        while True:
            slot = chunks % RING
            if whole is not None and paired is None:
                buffer = whole[decrypted : decrypted + RING_CHUNK + 16]
            else:
                # The slot's previous chunk is hashed and written once the submission after
                # it is done: at most HOLD_BACK + TAR_BLOCK < RING_CHUNK bytes are held back.
                hasher.wait_for(chunks - RING + 2)
                if slot == len(slots):
                    slots.append(memoryview(bytearray(RING_CHUNK + 16)))
                buffer = slots[slot]
            filled = _read_full(in_fd, buffer[:RING_CHUNK])
            if filled == 0:
                break
            if expected_size is not None and decrypted + filled > expected_size:
                raise IntegrityError(
                    f"stdin carries more than the {expected_size} bytes the layer's descriptor "
                    f"gives; {withheld}"
                )
            ciphertext = buffer[:filled]
            if mac is not None:
                mac.update(ciphertext)  # encrypt-then-MAC: over the ciphertext, before
                target = buffer  # decrypting in place
            elif whole is not None:
                target = whole[decrypted : decrypted + RING_CHUNK + 16]
            else:
                if slot == len(plain_slots):
                    plain_slots.append(memoryview(bytearray(RING_CHUNK + 16)))
                target = plain_slots[slot]
            plaintext = target[: ctr.update_into(ciphertext, target)]
            pending.append(plaintext)
            decrypted += filled
            chunks += 1
            if whole is not None:
                release = 0
            elif spool_fd is not None:
                release = decrypted - emitted
            else:
                release = _release_point(emitted, decrypted, expected_size, pending) - emitted
            emitted += release
            releases: list[memoryview] = []
            while release > 0:
                head = pending[0]
                take = min(release, len(head))
                releases.append(head[:take])
                release -= take
                if take == len(head):
                    pending.popleft()
                else:
                    pending[0] = head[take:]
            if paired is not None:
                hasher.submit(((paired, (ciphertext, plaintext)),))
                for view in releases:
                    sink(sink_fd, view)
            else:
                hasher.submit(((digest_hash, plaintext),), releases)
            if filled < RING_CHUNK:
                break
    except BaseException:
        hasher.abandon()
        raise
    hasher.finish()
    if expected_size is not None and expected_size != decrypted:
        raise IntegrityError(
            f"stdin ended after {decrypted} bytes but the layer's descriptor gives "
            f"{expected_size}; {withheld}"
        )
    if paired is not None:
        computed_mac, computed_digest = paired.finalize()
    else:
        computed_mac, computed_digest = mac.finalize(), digest_hash.finalize()
    warning = verify(params, computed_mac, computed_digest, accept_digest_mismatch, withheld)
    if spool_fd is not None:
        _copy_spool(spool_fd, out_fd, decrypted)
    if whole is not None:
        pending = deque([whole[:decrypted]])
    for rest in pending:
        write(out_fd, rest)
    return warning


def _spool_write(fd: int, data: memoryview) -> None:
    write_all(fd, data, "the spool file")


def _copy_spool(spool_fd: int, out_fd: int, size: int) -> None:
    """Send the verified plaintext from the spool file to out_fd (sendfile, else read+write)."""
    offset = 0
    try:
        while offset < size:
            try:
                sent = os.sendfile(out_fd, spool_fd, offset, min(size - offset, 1 << 30))
            except BlockingIOError:
                wait_until_ready(out_fd, for_writing=True)
                continue
            if sent == 0:
                raise OutputError("the spool file ended before the layer did")
            offset += sent
        return
    except BrokenPipeError as e:
        raise OutputError("the reader closed the output pipe before the layer was written") from e
    except OSError as e:
        if offset or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OutputError(f"cannot write the plaintext: {e.strerror}") from e
    view = memoryview(bytearray(RING_CHUNK))
    while offset < size:
        n = os.preadv(spool_fd, [view[: min(RING_CHUNK, size - offset)]], offset)
        if n == 0:
            raise OutputError("the spool file ended before the layer did")
        write_all(out_fd, view[:n])
        offset += n


def open_spool(directory: str) -> int:
    """An unnamed file in `directory` for the plaintext until it verifies: O_TMPFILE, so it
    vanishes with the process however that ends; else a named file removed at once."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise OutputError(
                f"cannot create a spool file in --spool-dir {directory}: {e.strerror}"
            ) from e
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".ctd-decoder-spool-", dir=directory)
    except OSError as e:
        raise OutputError(
            f"cannot create a spool file in --spool-dir {directory}: {e.strerror}"
        ) from e
    os.unlink(name)
    return fd


# --- encryption (the encoder) ------------------------------------------------------------------


class EncryptedLayer(NamedTuple):
    """What encrypting one layer produced, besides the ciphertext itself."""

    private_options: bytes  # JSON, to be wrapped for the recipients
    public_options: bytes  # JSON, for the pubopts annotation (base64)
    plaintext_digest: str
    ciphertext_digest: str
    size: int


def options_json(private: PrivateOptions | PublicOptions) -> bytes:
    """Serialize options as ocicrypt does (Go field order, []byte as padded base64)."""
    import base64
    import json

    def b64(value: bytes | None) -> str | None:
        return None if value is None else base64.b64encode(value).decode("ascii")

    cipher_options = {k: b64(v) for k, v in private.cipher_options.items()}
    if isinstance(private, PrivateOptions):
        body: dict[str, Any] = {
            "symkey": b64(private.symkey),
            "digest": private.digest,
            "cipheroptions": cipher_options,
        }
    else:
        body = {
            "cipher": private.cipher,
            "hmac": b64(private.hmac),
            "cipheroptions": cipher_options,
        }
    return json.dumps(body, separators=(",", ":")).encode()


def read_chunk(fd: int, view: memoryview, remaining: int | None) -> int:
    """Read into `view` from fd, never more than `remaining` bytes when that is given (a blob
    inside a tar archive ends before the file does); 0 means the end."""
    if remaining is not None:
        view = view[: min(len(view), remaining)]
        if not view:
            return 0
    try:
        return os.readv(fd, [view])
    except OSError as e:
        raise OutputError(f"cannot read the layer: {e.strerror}") from e


def slotted_chunks(
    hasher: SecondThread, in_fd: int, length: int | None = None
) -> Iterator[tuple[memoryview, memoryview]]:
    """The encoder's chunks: yields (input, output buffer of CHUNK + 16 bytes) from
    ENCRYPT_SLOTS pairs of buffers, each pair only once the submission made with it before is
    done, so the caller must submit to `hasher` exactly once per chunk. With `length`, exactly
    that many bytes at most are read."""
    slots = [(memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK + 16)))
             for _ in range(ENCRYPT_SLOTS)]
    size = index = 0
    while True:
        hasher.wait_for(index - ENCRYPT_SLOTS + 1)  # this pair's hashes are done
        in_view, out_view = slots[index % ENCRYPT_SLOTS]
        n = read_chunk(in_fd, in_view, None if length is None else length - size)
        if not n:
            return
        size += n
        index += 1
        yield in_view[:n], out_view


def encrypt_stream(
    in_fd: int,
    out_fd: int,
    expected_digest: str | None = None,
    length: int | None = None,
    progress: Callable[[int], None] | None = None,
    output_name: str = "the encrypted layer",
) -> EncryptedLayer:
    """Encrypt in_fd to out_fd with a fresh key and nonce, in constant memory.

    The plaintext's sha256 becomes the private options' digest; when `expected_digest` is
    given (the source descriptor's digest) and differs, IntegrityError is raised after the
    stream, so a corrupt source blob is never published as a valid layer. With `length`,
    exactly that many bytes are read; `progress` is called with the count after each chunk."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = os.urandom(KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ctr = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    plain_digest = digest_context("sha256")
    # Three hashes per byte: the main thread reads, digests the plaintext, encrypts and
    # writes; the second thread MACs and digests the ciphertext of the chunk before, both at
    # once where sha256pair can run (the same bytes as its two streams).
    from decoder import sha256pair

    paired = sha256pair.mac_and_digest(key)
    mac: Any = None
    cipher_digest: Any = None
    if paired is None:
        mac, cipher_digest = mac_context(key), digest_context("sha256")
    hasher = SecondThread()
    size = 0
    try:
        for plaintext, out_view in slotted_chunks(hasher, in_fd, length):
            n = len(plaintext)
            plain_digest.update(plaintext)
            ctr.update_into(plaintext, out_view)
            ciphertext = out_view[:n]
            if paired is not None:
                hasher.submit(((paired, (ciphertext, ciphertext)),))
            else:
                hasher.submit(((mac, ciphertext), (cipher_digest, ciphertext)))
            write_all(out_fd, out_view[:n], output_name)
            size += n
            if progress is not None:
                progress(size)
    except BaseException:
        hasher.abandon()
        raise
    hasher.finish()
    if length is not None and size != length:
        raise IntegrityError(f"the source layer ended after {size} of its {length} bytes")
    digest = "sha256:" + plain_digest.finalize().hex()
    if expected_digest is not None and expected_digest != digest:
        raise IntegrityError(
            f"the source layer's content is {digest}, "
            f"not the {expected_digest} its descriptor gives"
        )
    if paired is not None:
        computed_mac, ciphertext_sha256 = paired.finalize()
    else:
        computed_mac, ciphertext_sha256 = mac.finalize(), cipher_digest.finalize()
    private = PrivateOptions(key, digest, {"nonce": nonce})
    public = PublicOptions(CIPHER_AES_256_CTR_HMAC_SHA256, computed_mac, {})
    return EncryptedLayer(
        private_options=options_json(private),
        public_options=options_json(public),
        plaintext_digest=digest,
        ciphertext_digest="sha256:" + ciphertext_sha256.hex(),
        size=size,
    )

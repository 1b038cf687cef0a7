"""OCI image layouts and oci-archive tars: naming an image in one, reading it, writing one.

Owns the `oci:DIR[:REF]` and `oci-archive:FILE[:REF]` locations, the index.json entry a REF
names, and the blobs: read in constant memory with their size and digest checked, and
written so that the destination appears complete or not at all. A new directory layout is
built beside its final path and renamed into place; an existing one gets its new blobs first
and its index.json last (replaced atomically), so its other images stay as they were; an
archive is written to a temporary file beside it and renamed. A source is only ever read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from decoder.errors import LayoutError, UsageError
from decoder.layercipher import CHUNK, read_chunk, write_all
from decoder.spec import OCI_INDEX, REF_NAME_ANNOTATION

TRANSPORTS = ("oci", "oci-archive")
LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
MAX_JSON_BYTES = 4 * 1024 * 1024
_DIGEST = re.compile(r"(sha256|sha512):([0-9a-f]+)")
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
# a blob's header in an archive: a PAX extended header (its path, which for a sha512 blob is
# longer than ustar's 100 characters, and its size past 8 GiB) and the ustar header, always
# these three blocks, so that room for it can be left before the blob's digest is known
_BLOB_HEADER = 3 * _TAR_BLOCK

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Location:
    """Where an image is: a transport, a path and, optionally, the REF naming it there."""

    transport: str
    path: str
    ref: str | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref else "")


def parse_location(text: str) -> Location:
    """Read `oci:DIR[:REF]` or `oci-archive:FILE[:REF]`; the path ends at its first colon,
    as in skopeo, so a REF may hold colons (`oci:dir:example.com/app:1.0`)."""
    transport, colon, rest = text.partition(":")
    if not colon or transport not in TRANSPORTS:
        raise UsageError(
            f"{text!r} is not an image location: use oci:DIR[:REF] or oci-archive:FILE[:REF]"
        )
    path, _, ref = rest.partition(":")
    if not path:
        raise UsageError(f"{text!r} names no {'directory' if transport == 'oci' else 'file'}")
    return Location(transport, path, ref or None)


def check_descriptor(descriptor: Any, what: str) -> tuple[str, int]:
    """The (digest, size) of a descriptor, refusing one a blob path cannot be made from."""
    if not isinstance(descriptor, dict):
        raise LayoutError(f"{what} is not a JSON object")
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
        raise LayoutError(f"{what} lacks a digest or a size")
    blob_name(digest)
    if size < 0:
        raise LayoutError(f"{what} has a negative size")
    media_type = descriptor.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise LayoutError(f"{what} has a mediaType that is not a string")
    annotations = descriptor.get("annotations")
    if annotations is not None:
        if not isinstance(annotations, dict):
            raise LayoutError(f"{what} has annotations that are not a JSON object")
        for name, value in annotations.items():
            if not isinstance(value, str):
                raise LayoutError(f"{what} has an annotation {name!r} that is not a string")
    return digest, size


def blob_name(digest: str) -> str:
    """The path of a blob inside a layout, after checking the digest's form."""
    match = _DIGEST.fullmatch(digest)
    if match is None or len(match[2]) != _HEX_LENGTH[match[1]]:
        raise LayoutError(f"{digest!r} is not a sha256 or sha512 digest")
    return f"blobs/{match[1]}/{match[2]}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Blob:
    """An open blob: read `size` bytes from `fd`, starting where it is positioned."""

    fd: int
    size: int
    digest: str


def copy_verified(blob: Blob, out_fd: int | None, progress: Progress | None = None) -> None:
    """Stream a blob to out_fd (or nowhere), raising LayoutError unless its digest matches."""
    algorithm = blob.digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    view = memoryview(bytearray(CHUNK))
    done = 0
    while n := read_chunk(blob.fd, view, blob.size - done):
        hasher.update(view[:n])
        if out_fd is not None:
            write_all(out_fd, view[:n], "the destination")
        done += n
        if progress is not None:
            progress(done)
    if done != blob.size:
        raise LayoutError(f"blob {blob.digest} ended after {done} of its {blob.size} bytes")
    if f"{algorithm}:{hasher.hexdigest()}" != blob.digest:
        raise LayoutError(f"blob {blob.digest} is corrupt: its content has another digest")


class Layout:
    """An image layout opened for reading: an OCI layout directory or an oci-archive tar."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self._members: dict[str, tuple[int, int]] = {}  # archive: name -> (offset, size)
        if location.transport == "oci":
            self._open_directory()
        else:
            self._open_archive()
        layout = self.read_file(LAYOUT_FILE, 4096)
        try:
            version = json.loads(layout).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if not isinstance(version, str):
            raise LayoutError(f"{self.where} has a malformed {LAYOUT_FILE} file")
        index = self.read_file(INDEX_FILE, MAX_JSON_BYTES)
        try:
            self.index: dict[str, Any] = json.loads(index)
        except (ValueError, RecursionError) as e:
            raise LayoutError(f"{self.where}: {INDEX_FILE} is not valid JSON") from e
        if not isinstance(self.index, dict) or not isinstance(self.index.get("manifests"), list):
            raise LayoutError(f"{self.where}: {INDEX_FILE} is not an image index")

    @property
    def where(self) -> str:
        kind = "OCI layout" if self.location.transport == "oci" else "oci-archive"
        return f"{kind} {self.location.path}"

    def _open_directory(self) -> None:
        path = self.location.path
        if not os.path.isdir(path):
            raise LayoutError(
                f"{path} is not a directory"
                if os.path.exists(path) else f"{path} does not exist"
            )
        if not os.path.isfile(os.path.join(path, LAYOUT_FILE)):
            raise LayoutError(f"{path} is not an OCI image layout (it has no {LAYOUT_FILE} file)")

    def _open_archive(self) -> None:
        path = self.location.path
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isreg() and not member.issparse():
                        self._members[name] = (member.offset_data, member.size)
        except FileNotFoundError as e:
            raise LayoutError(f"{path} does not exist") from e
        except IsADirectoryError as e:
            raise LayoutError(f"{path} is a directory, not an oci-archive tar file") from e
        except OSError as e:
            raise LayoutError(f"{path} cannot be read: {e.strerror}") from e
        except tarfile.TarError as e:
            raise LayoutError(f"{path} is not an oci-archive (not an uncompressed tar)") from e
        if LAYOUT_FILE not in self._members:
            raise LayoutError(f"{path} is not an oci-archive (it holds no {LAYOUT_FILE} file)")

    @contextlib.contextmanager
    def _open(self, name: str, missing: str) -> Iterator[tuple[int, int]]:
        """An fd positioned at the file `name` of the layout, and the file's size."""
        if self.location.transport == "oci":
            path = os.path.join(self.location.path, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError as e:
                raise LayoutError(missing) from e
            except OSError as e:
                raise LayoutError(f"{path} cannot be read: {e.strerror}") from e
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise LayoutError(f"{path} is not a regular file")
            size = st.st_size
        else:
            if name not in self._members:
                raise LayoutError(missing)
            offset, size = self._members[name]
            try:
                fd = os.open(self.location.path, os.O_RDONLY)
            except OSError as e:
                raise LayoutError(f"{self.location.path} cannot be read: {e.strerror}") from e
            os.lseek(fd, offset, os.SEEK_SET)
        try:
            yield fd, size
        finally:
            os.close(fd)

    def read_file(self, name: str, limit: int) -> bytes:
        with self._open(name, f"{self.where} has no {name} file") as (fd, size):
            if size > limit:
                raise LayoutError(f"{self.where}: {name} is larger than {limit} bytes")
            data = bytearray()
            view = memoryview(bytearray(min(size, CHUNK) or 1))
            while len(data) < size and (n := read_chunk(fd, view, size - len(data))):
                data += view[:n]
            return bytes(data)

    @contextlib.contextmanager
    def open_blob(self, descriptor: dict[str, Any], what: str = "a blob") -> Iterator[Blob]:
        """The blob a descriptor names, its size checked against the descriptor."""
        digest, size = check_descriptor(descriptor, what)
        with self._open(blob_name(digest), f"{self.where} lacks {what}, {digest}") as (fd, real):
            if real != size:
                raise LayoutError(
                    f"{self.where}: {what} {digest} is {real} bytes, not the {size} its "
                    "descriptor gives"
                )
            yield Blob(fd, size, digest)

    def read_json_blob(self, descriptor: dict[str, Any], what: str) -> tuple[bytes, Any]:
        """A small JSON blob (manifest, index, config), digest-verified, raw and parsed."""
        digest, size = check_descriptor(descriptor, what)
        if size > MAX_JSON_BYTES:
            raise LayoutError(f"{what} {digest} is larger than {MAX_JSON_BYTES} bytes")
        data = self.read_file(blob_name(digest), MAX_JSON_BYTES)
        algorithm = digest.partition(":")[0]
        if len(data) != size or f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
            raise LayoutError(f"{self.where}: {what} {digest} is corrupt (digest or size differs)")
        try:
            return data, json.loads(data)
        except (ValueError, RecursionError) as e:
            raise LayoutError(f"{self.where}: {what} {digest} is not valid JSON") from e

    def blob_digests(self) -> list[str]:
        """Every blob the layout holds, by digest (to carry an archive's blobs over)."""
        if self.location.transport == "oci":
            names = []
            for algorithm in _HEX_LENGTH:
                directory = os.path.join(self.location.path, "blobs", algorithm)
                if os.path.isdir(directory):
                    names += [f"{algorithm}:{hexdigest}" for hexdigest in os.listdir(directory)]
        else:
            names = [
                name[len("blobs/") :].replace("/", ":", 1)
                for name in self._members if name.startswith("blobs/")
            ]
        return sorted(name for name in names if _is_digest(name))

    def blob_size(self, digest: str) -> int:
        name = blob_name(digest)
        if self.location.transport == "oci":
            return os.stat(os.path.join(self.location.path, name)).st_size
        return self._members[name][1]

    def find_image(self, ref: str | None) -> dict[str, Any]:
        """The index.json entry REF names, or the layout's only entry when REF is None."""
        entries = [e for e in self.index["manifests"] if isinstance(e, dict)]
        names = sorted({name for e in entries if (name := ref_name(e))})
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        if ref is None:
            if len(entries) == 1:
                return entries[0]
            if not entries:
                raise LayoutError(f"{self.where} holds no image")
            raise LayoutError(
                f"{self.where} holds {len(entries)} images; name one as "
                f"{self.location.transport}:{self.location.path}:REF (refs: {shown or 'none'})"
            )
        found = [e for e in entries if ref_name(e) == ref]
        if not found:
            raise LayoutError(
                f"{self.where} has no image named {ref!r} (refs: {shown or 'none'})"
            )
        if len(found) > 1:
            raise LayoutError(f"{self.where} has {len(found)} images named {ref!r}")
        return found[0]


def ref_name(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict):
        name = annotations.get(REF_NAME_ANNOTATION)
        return name if isinstance(name, str) else None
    return None


def _is_digest(text: str) -> bool:
    match = _DIGEST.fullmatch(text)
    return match is not None and len(match[2]) == _HEX_LENGTH[match[1]]


def open_layout(location: Location) -> Layout:
    return Layout(location)


# --- writing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while a destination is committed, so that an
    interruption comes before (everything is removed) or after (the image is complete),
    never between index.json being replaced and the bookkeeping that says so. One that
    comes meanwhile is noted in LATE_SIGNALS instead of raising: the commit finishes (or
    fails on its own), and must not then be reported as interrupted. (Handlers, not a
    signal mask: a mask holds only this thread, and the kernel may hand a process's signal
    to another.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.getsignal(number) for number in held}
    for number in held:
        if previous[number] is not signal.SIG_IGN:  # one ignored (nohup) stays ignored
            signal.signal(number, lambda caught, _frame: LATE_SIGNALS.append(caught))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


LATE_SIGNALS: list[int] = []  # signals that came while a commit held them
COMMITTED: list[str] = []  # destinations committed in full (set while signals are held)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(replacing: str | None = None) -> int:
    """The mode for a file put in place: what the umask allows (temporary files start at
    0600, which would otherwise stay), no more than the file it replaces had."""
    allowed = 0o666 & ~_umask()
    if replacing is not None:
        with contextlib.suppress(OSError):
            return allowed & stat.S_IMODE(os.stat(replacing).st_mode)
    return allowed


def directory_mode() -> int:
    return 0o777 & ~_umask()


@contextlib.contextmanager
def _writing(what: str, path: str) -> Iterator[None]:
    """Turn an OSError while writing DST into one LayoutError line naming the path."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        # the directory the failed call worked in (the file names there are temporary)
        place = f" in {os.path.dirname(e.filename)}" if isinstance(e.filename, str) else ""
        raise LayoutError(f"cannot write {what} {path}: {reason}{place}") from e


@dataclass
class BlobSink:
    """Where one new blob is being written: write its bytes to `fd`, then commit it."""

    fd: int
    destination: Destination
    token: Any = None
    committed: bool = False

    def commit(self, digest: str, size: int) -> None:
        self.destination._commit_sink(self, digest, size)
        self.committed = True


@dataclass
class Destination:
    """An image layout being written. Nothing is visible at its location before commit()."""

    location: Location
    existing: Layout | None = None
    _written: set[str] = field(default_factory=set)

    @property
    def existing_index(self) -> dict[str, Any] | None:
        return None if self.existing is None else self.existing.index

    def has_blob(self, digest: str) -> bool:
        raise NotImplementedError

    def blob_sink(self) -> contextlib.AbstractContextManager[BlobSink]:
        raise NotImplementedError

    def _commit_sink(self, sink: BlobSink, digest: str, size: int) -> None:
        raise NotImplementedError

    def commit(self, index: dict[str, Any]) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob (a manifest or an index); return its digest."""
        digest = digest_of(data)
        if not self.has_blob(digest):
            with self.blob_sink() as sink:
                write_all(sink.fd, memoryview(data), "the destination")
                sink.commit(digest, len(data))
        return digest

    def copy_blob(
        self, source: Layout, descriptor: dict[str, Any], what: str,
        progress: Progress | None = None,
    ) -> None:
        """Copy a blob unchanged from source, verifying it (skipped when already here)."""
        digest, _ = check_descriptor(descriptor, what)
        if self.has_blob(digest):
            return
        with source.open_blob(descriptor, what) as blob, self.blob_sink() as sink:
            copy_verified(blob, sink.fd, progress)
            sink.commit(digest, blob.size)


class DirectoryDestination(Destination):
    """An OCI layout directory: a new one staged beside its path, or an existing one."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        path = location.path
        self._added: list[str] = []  # blobs new in an existing layout, removed by abort()
        self._created: list[str] = []  # directories likewise
        self._staging: str | None = None
        try:
            populated = os.path.isdir(path) and bool(os.listdir(path))
        except OSError as e:
            raise LayoutError(f"{path} cannot be read: {e.strerror}") from e
        if populated:
            if not os.path.isfile(os.path.join(path, LAYOUT_FILE)):
                raise LayoutError(f"{path} exists and is not an OCI image layout")
            self.existing = Layout(location)
            self.root = path
        elif os.path.lexists(path) and not os.path.isdir(path):
            raise LayoutError(f"{path} exists and is not a directory")
        else:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise LayoutError(f"the directory {parent} for {path} does not exist")
            name = os.path.basename(os.path.abspath(path))
            with _writing("the new OCI layout", path):
                self._staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial",
                                                 dir=parent)
            self.root = self._staging
            try:
                with _writing("the new OCI layout", path), \
                        open(os.path.join(self.root, LAYOUT_FILE), "wb") as f:
                    f.write(LAYOUT_VERSION)
            except BaseException:
                self.abort()
                raise

    @property
    def _what(self) -> str:
        return "the new OCI layout" if self._staging is not None else "into the OCI layout"

    def has_blob(self, digest: str) -> bool:
        return digest in self._written or os.path.isfile(os.path.join(self.root, blob_name(digest)))

    @contextlib.contextmanager
    def blob_sink(self) -> Iterator[BlobSink]:
        directory = os.path.join(self.root, "blobs")
        with _writing(self._what, self.location.path):
            if not os.path.isdir(directory):
                os.makedirs(directory)
                self._created.append(directory)
            fd, temp = tempfile.mkstemp(prefix=".partial-", dir=directory)
        sink = BlobSink(fd, self, temp)
        try:
            yield sink
        finally:
            os.close(fd)
            if not sink.committed:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    def _commit_sink(self, sink: BlobSink, digest: str, size: int) -> None:
        final = os.path.join(self.root, blob_name(digest))
        with _writing(self._what, self.location.path):
            directory = os.path.dirname(final)
            if not os.path.isdir(directory):
                os.makedirs(directory)
                self._created.append(directory)
            os.fchmod(sink.fd, file_mode())
            os.fsync(sink.fd)
            existed = os.path.exists(final)
            os.replace(sink.token, final)
        if not existed:
            self._added.append(final)
        self._written.add(digest)

    def commit(self, index: dict[str, Any]) -> None:
        with _signals_held(), _writing(self._what, self.location.path):
            fd, temp = tempfile.mkstemp(prefix=".index.", dir=self.root)
            try:
                try:
                    write_all(fd, memoryview(json_bytes(index)), "index.json")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                index_path = os.path.join(self.root, INDEX_FILE)
                os.chmod(temp, file_mode(index_path))
                os.replace(temp, index_path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            if self._staging is None:  # the existing layout's new index.json is in place
                self._added.clear()
                self._created.clear()
                COMMITTED.append(str(self.location))
                return
            for directory in (self.root, os.path.join(self.root, "blobs")):
                os.chmod(directory, directory_mode())  # mkdtemp made them 0700
            try:
                os.rename(self._staging, self.location.path)
            except OSError as e:
                raise LayoutError(
                    f"cannot move the new layout into place at {self.location.path}: {e.strerror}"
                ) from e
            self._staging = None
            COMMITTED.append(str(self.location))

    def abort(self) -> None:
        if self._staging is not None:
            import shutil

            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        for path in self._added:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        self._added.clear()
        self._created.clear()


class ArchiveDestination(Destination):
    """An oci-archive tar written to a temporary file beside FILE and renamed over it.

    Blobs are streamed straight into the tar: a placeholder header goes first and is
    rewritten with the blob's name and size once its digest is known (a PAX header, so
    sha512 names and sizes past 8 GiB fit). An existing archive's blobs and index entries
    are carried over."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        path = location.path
        if os.path.isdir(path):
            raise LayoutError(f"{path} is a directory, not an oci-archive file")
        if os.path.lexists(path):
            self.existing = Layout(location)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise LayoutError(f"the directory {parent} for {path} does not exist")
        name = os.path.basename(os.path.abspath(path))
        with _writing("the oci-archive", path):
            self._fd, self._temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial",
                                                    dir=parent)
        self._closed = False
        self._temp_left = True  # the temporary file is still there to remove on abort
        try:
            self._add_entry(LAYOUT_FILE, LAYOUT_VERSION)
            for directory in ("blobs/", "blobs/sha256/"):
                self._write(self._header(directory, 0, directory=True))
            if self.existing is not None:
                for digest in self.existing.blob_digests():
                    size = self.existing.blob_size(digest)
                    self.copy_blob(self.existing, {"digest": digest, "size": size}, "a blob")
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _header(name: str, size: int, directory: bool = False, blob: bool = False) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        info.mode = 0o755 if directory else 0o644
        info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        if blob:  # always the PAX header, even when ustar could do: _BLOB_HEADER bytes
            info.pax_headers = {"path": name}
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")

    def _write(self, data: bytes) -> None:
        write_all(self._fd, memoryview(data), self.location.path)

    def _pad(self, size: int) -> None:
        if size % _TAR_BLOCK:
            self._write(bytes(_TAR_BLOCK - size % _TAR_BLOCK))

    def _add_entry(self, name: str, data: bytes) -> None:
        self._write(self._header(name, len(data)))
        self._write(data)
        self._pad(len(data))

    def has_blob(self, digest: str) -> bool:
        return digest in self._written

    def _truncate(self, offset: int) -> None:
        with _writing("the oci-archive", self.location.path):
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)

    @contextlib.contextmanager
    def blob_sink(self) -> Iterator[BlobSink]:
        start = os.lseek(self._fd, 0, os.SEEK_END)
        self._write(bytes(_BLOB_HEADER))
        sink = BlobSink(self._fd, self, start)
        try:
            yield sink
        finally:
            if not sink.committed:
                self._truncate(start)

    def _commit_sink(self, sink: BlobSink, digest: str, size: int) -> None:
        start: int = sink.token
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
        written = end - start - _BLOB_HEADER
        if written != size:
            raise LayoutError(f"blob {digest}: wrote {written} bytes, not {size}")
        if digest in self._written:
            self._truncate(start)
            return
        header = self._header(blob_name(digest), size, blob=True)
        if len(header) != _BLOB_HEADER:
            raise LayoutError(f"blob {digest}: its tar header is {len(header)} bytes, not "
                              f"the {_BLOB_HEADER} set aside for it")
        self._pad(size)
        with _writing("the oci-archive", self.location.path):
            os.pwrite(self._fd, header, start)
        self._written.add(digest)

    def commit(self, index: dict[str, Any]) -> None:
        with _signals_held():
            self._add_entry(INDEX_FILE, json_bytes(index))
            end = os.lseek(self._fd, 0, os.SEEK_END) + 2 * _TAR_BLOCK
            self._write(bytes(2 * _TAR_BLOCK + (-end) % _TAR_RECORD))
            with _writing("the oci-archive", self.location.path):
                os.fchmod(self._fd, file_mode(self.location.path))
                os.fsync(self._fd)
                os.close(self._fd)
                self._closed = True
                os.replace(self._temp, self.location.path)
                self._temp_left = False
                COMMITTED.append(str(self.location))

    def abort(self) -> None:
        if not self._closed:
            os.close(self._fd)
            self._closed = True
        if self._temp_left:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)
            self._temp_left = False


def open_destination(location: Location) -> Destination:
    if location.transport == "oci":
        return DirectoryDestination(location)
    return ArchiveDestination(location)


def merged_index(existing: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
    """index.json for the destination: its other entries kept, `entry` replacing any entry of
    the same ref name (or, without one, an identical untagged entry)."""
    index = dict(existing) if existing else {"schemaVersion": 2, "mediaType": OCI_INDEX}
    name = ref_name(entry)
    kept = [
        e for e in (existing or {}).get("manifests", [])
        if not (isinstance(e, dict) and (
            (name is not None and ref_name(e) == name)
            or (name is None and ref_name(e) is None and e.get("digest") == entry["digest"])
        ))
    ]
    index["manifests"] = [*kept, entry]
    return index

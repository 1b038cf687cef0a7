"""ctd-encoder against hostile and broken input: image graphs that repeat themselves, malformed
indexes, manifests and annotations, sha512 blobs in archives, recipients and --key arguments it
cannot use, destinations it cannot write, signals, a closed stdout, and wrapped plaintext
digests it must not show. Each failure must be one line `ctd-encoder: ...` with exit status 1
(or 128+N for a signal), no traceback, and nothing left behind."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from decoder import ocilayout
from decoder.errors import OutputError
from tests.layouts import (
    GZIP,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Layer,
    LayoutBuilder,
    Reader,
    random_layers,
    simple_image,
    tree_state,
)
from tests.support import KEYS, encrypt_layer
from tests.test_encoder import Encoder, Run, encoder, ok, refused

JWE_KEYS = "org.opencontainers.image.enc.keys.jwe"
PUBOPTS = "org.opencontainers.image.enc.pubopts"
PUB = KEYS / "rsa2048.pub.pem"
PRIV = KEYS / "rsa2048-pkcs8.pem"
__all__ = ["encoder"]  # the fixture, imported for its use here
SCRIPT = Path(sys.executable).with_name("ctd-encoder")


def write_blob(root: Path, data: bytes, algorithm: str = "sha256") -> str:
    hexdigest = hashlib.new(algorithm, data).hexdigest()
    (root / "blobs" / algorithm).mkdir(parents=True, exist_ok=True)
    (root / "blobs" / algorithm / hexdigest).write_bytes(data)
    return f"{algorithm}:{hexdigest}"


def config(builder: LayoutBuilder) -> dict[str, Any]:
    return builder.json_blob({"architecture": "amd64", "os": "linux"}, OCI_CONFIG)


def manifest_of(builder: LayoutBuilder, layers: list[dict[str, Any]]) -> dict[str, Any]:
    return builder.json_blob({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                              "config": config(builder), "layers": layers}, OCI_MANIFEST)


# --- 1. an image graph that lists the same blobs over and over -----------------------------


def repeating_image(root: Path, repeats: int) -> LayoutBuilder:
    """An index listing one sub-index `repeats` times, which lists one manifest `repeats`
    times: repeats**2 paths to a single manifest."""
    builder = LayoutBuilder(root)
    manifest = {**builder.manifest([Layer(os.urandom(100))]),
                "platform": {"os": "linux", "architecture": "amd64"}}
    inner = builder.json_blob({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": [manifest] * repeats}, OCI_INDEX)
    outer = builder.json_blob({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": [inner] * repeats}, OCI_INDEX)
    builder.add(outer)
    return builder


@pytest.fixture
def json_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digest of every manifest, index and config the encoder reads from SRC."""
    reads: list[str] = []
    original = ocilayout.Layout.read_json_blob

    def counting(self: ocilayout.Layout, descriptor: dict[str, Any], what: str) -> Any:
        reads.append(str(descriptor.get("digest")))
        return original(self, descriptor, what)

    monkeypatch.setattr(ocilayout.Layout, "read_json_blob", counting)
    return reads


def test_a_repeated_subindex_is_read_and_walked_once(
    encoder: Encoder, tmp_path: Path, json_reads: list[str]
) -> None:
    """100 x 100 paths to one manifest: each of the three JSON blobs is read once, layerinfo
    lists the one manifest once, and encrypt writes it once while keeping both indexes'
    100 entries (the path-by-path walk read 20,000 blobs; at 3000 x 3000 it never ended)."""
    repeating_image(tmp_path / "src", 100)
    info = json.loads(ok(encoder("layerinfo", "--json", f"oci:{tmp_path / 'src'}")).stdout)
    assert len(info["manifests"]) == 1
    assert len(json_reads) == len(set(json_reads)) == 3, len(json_reads)
    json_reads.clear()
    ok(encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'enc'}"))
    assert len(json_reads) == 3, len(json_reads)
    out = Reader(tmp_path / "enc")
    outer = out.json(out.entry()["digest"])
    assert len(outer["manifests"]) == 100 and len({m["digest"] for m in outer["manifests"]}) == 1
    inner = out.json(outer["manifests"][0]["digest"])
    assert len(inner["manifests"]) == 100 and len({m["digest"] for m in inner["manifests"]}) == 1
    (layer,) = out.json(inner["manifests"][0]["digest"])["layers"]
    assert layer["mediaType"] == GZIP + "+encrypted"
    ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'enc'}", f"oci:{tmp_path / 'dec'}"))


def test_more_descriptors_than_the_limit_are_refused(encoder: Encoder, tmp_path: Path) -> None:
    builder = LayoutBuilder(tmp_path / "src")
    manifest = builder.manifest([Layer(os.urandom(100))])
    builder.add(builder.json_blob({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                   "manifests": [manifest] * 10_001}, OCI_INDEX))
    before = tree_state(tmp_path)
    for command in (["layerinfo"], ["encrypt", "--recipient", f"jwe:{PUB}"]):
        destination = [f"oci:{tmp_path / 'dst'}"] if command[0] == "encrypt" else []
        refused(encoder(*command, f"oci:{tmp_path / 'src'}", *destination),
                "past 10000 descriptors", "refused as malformed")
    assert tree_state(tmp_path) == before


# --- 2. malformed indexes, manifests and annotations ---------------------------------------


def _encrypted_layer(annotations: dict[str, Any]) -> Layer:
    layer = encrypt_layer(os.urandom(3000), [PUB])
    return Layer(layer.ciphertext, GZIP + "+encrypted",
                 extra={"annotations": {**layer.descriptor["annotations"], **annotations}})


def _malformed(root: Path, case: str) -> None:
    builder = LayoutBuilder(root)
    if case == "index without manifests":
        builder.add(builder.json_blob({"schemaVersion": 2}, OCI_INDEX))
    elif case == "index manifests a number":
        builder.add(builder.json_blob({"schemaVersion": 2, "manifests": 5}, OCI_INDEX))
    elif case == "manifest without layers":
        builder.add(builder.json_blob({"schemaVersion": 2, "config": config(builder)},
                                      OCI_MANIFEST))
    elif case == "manifest an array":
        builder.add(builder.json_blob([1, 2], OCI_MANIFEST))
    elif case == "layer annotations a list":
        builder.add(builder.manifest([Layer(os.urandom(3000), extra={"annotations": ["a"]})]))
    elif case == "keys annotation a number":
        builder.add(builder.manifest([_encrypted_layer({JWE_KEYS: 1})]))
    elif case == "pubopts annotation a number":
        builder.add(builder.manifest([_encrypted_layer({PUBOPTS: 2})]))
    elif case == "layer media type a list":
        builder.add(builder.manifest([Layer(os.urandom(3000), extra={"mediaType": [GZIP]})]))
    elif case == "index.json entry annotations a list":
        builder.add(builder.manifest(random_layers(1)), ref=None)
        index = json.loads((root / "index.json").read_text())
        index["manifests"][0]["annotations"] = ["latest"]
        (root / "index.json").write_text(json.dumps(index))
    else:
        raise AssertionError(case)


MALFORMED: list[tuple[str, list[str], str]] = [
    ("index without manifests", ["layerinfo"], "is not an image index (it has no manifests"),
    ("index manifests a number", ["layerinfo"], "is not an image index (it has no manifests"),
    ("index manifests a number", ["encrypt"], "is not an image index"),
    ("manifest without layers", ["layerinfo"], "is not an image manifest (it has no layers"),
    ("manifest without layers", ["encrypt"], "is not an image manifest"),
    ("manifest an array", ["layerinfo"], "is not an image manifest (it has no layers"),
    ("layer annotations a list", ["encrypt"], "layer 0 of manifest sha256:"),
    ("layer annotations a list", ["layerinfo"], "annotations that are not a JSON object"),
    ("keys annotation a number", ["layerinfo"], f"annotation '{JWE_KEYS}' that is not a"),
    ("keys annotation a number", ["layerinfo", "--key", str(PRIV)], f"annotation '{JWE_KEYS}'"),
    ("keys annotation a number", ["decrypt", "--key", str(PRIV)], f"annotation '{JWE_KEYS}'"),
    ("pubopts annotation a number", ["decrypt", "--key", str(PRIV)], f"annotation '{PUBOPTS}'"),
    ("pubopts annotation a number", ["layerinfo", "--key", str(PRIV)], f"'{PUBOPTS}' that is"),
    ("layer media type a list", ["encrypt"], "layer 0 of manifest sha256:"),
    ("index.json entry annotations a list", ["encrypt"], "annotations that are not a JSON"),
]


@pytest.mark.parametrize(("case", "command", "message"), MALFORMED,
                         ids=[f"{c}-{' '.join(a[:1])}" for c, a, _ in MALFORMED])
def test_malformed_source_is_one_line(
    encoder: Encoder, tmp_path: Path, case: str, command: list[str], message: str
) -> None:
    _malformed(tmp_path / "src", case)
    before = tree_state(tmp_path)
    arguments = [*command]
    if command[0] == "encrypt":
        arguments += ["--recipient", f"jwe:{PUB}"]
    arguments.append(f"oci:{tmp_path / 'src'}")
    if command[0] != "layerinfo":
        arguments.append(f"oci:{tmp_path / 'dst'}")
    refused(encoder(*arguments), message)
    assert tree_state(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- 3. sha512 blobs and long names in archives --------------------------------------------


def sha512_image(root: Path) -> tuple[bytes, str, Layer]:
    """A manifest whose first layer is addressed by sha512, its second a plain sha256 one."""
    builder = LayoutBuilder(root)
    data = os.urandom(2000)
    d512 = write_blob(root, data, "sha512")
    plain = Layer(os.urandom(3000))
    builder.blob(plain.data)
    builder.add(manifest_of(builder, [{"mediaType": GZIP, "digest": d512, "size": len(data)},
                                      plain.descriptor()]))
    return data, d512, plain


def extract(archive: Path, into: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")


def test_sha512_blob_round_trips_through_an_archive(encoder: Encoder, tmp_path: Path) -> None:
    data, d512, plain = sha512_image(tmp_path / "src")
    ok(encoder("encrypt", "--recipient", f"jwe:{PUB}", "--layer", "1",
               f"oci:{tmp_path / 'src'}", f"oci-archive:{tmp_path / 'enc.tar'}"))
    with tarfile.open(tmp_path / "enc.tar") as tar:
        names = tar.getnames()
    assert f"blobs/sha512/{d512[7:]}" in names
    extract(tmp_path / "enc.tar", tmp_path / "enc")
    assert (tmp_path / "enc" / "blobs" / "sha512" / d512[7:]).read_bytes() == data
    (_, encrypted) = Reader(tmp_path / "enc").manifest()["layers"]
    assert Reader(tmp_path / "enc").blob(encrypted["digest"]) != plain.data
    # the archive as SRC: read (layerinfo), decrypted into another archive and a directory
    info = json.loads(ok(encoder("layerinfo", "--json",
                                 f"oci-archive:{tmp_path / 'enc.tar'}")).stdout)
    assert info["manifests"][0]["layers"][0]["digest"] == d512
    ok(encoder("decrypt", "--key", PRIV, f"oci-archive:{tmp_path / 'enc.tar'}",
               f"oci-archive:{tmp_path / 'dec.tar'}"))
    ok(encoder("decrypt", "--key", PRIV, f"oci-archive:{tmp_path / 'enc.tar'}",
               f"oci:{tmp_path / 'dec'}"))
    extract(tmp_path / "dec.tar", tmp_path / "dec-from-tar")
    for root in (tmp_path / "dec", tmp_path / "dec-from-tar"):
        layers = Reader(root).manifest()["layers"]
        assert layers == [{"mediaType": GZIP, "digest": d512, "size": len(data)},
                          plain.descriptor()]
        assert (root / "blobs" / "sha512" / d512[7:]).read_bytes() == data


def test_decrypting_to_a_sha512_plaintext_digest_in_an_archive(
    encoder: Encoder, tmp_path: Path
) -> None:
    """A layer whose private options give a sha512 plaintext digest is stored under it."""
    plaintext = os.urandom(5000)
    d512 = "sha512:" + hashlib.sha512(plaintext).hexdigest()
    layer = encrypt_layer(plaintext, [PUB], private={"digest": d512})
    builder = LayoutBuilder(tmp_path / "src")
    builder.blob(layer.ciphertext)
    builder.add(manifest_of(builder, [layer.descriptor]))
    result = ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'src'}",
                        f"oci-archive:{tmp_path / 'dec.tar'}"))
    assert d512 in result.stdout  # the decrypted layer's new digest is public
    extract(tmp_path / "dec.tar", tmp_path / "dec")
    (got,) = Reader(tmp_path / "dec").manifest()["layers"]
    assert got["digest"] == d512
    assert (tmp_path / "dec" / "blobs" / "sha512" / d512[7:]).read_bytes() == plaintext


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_archives_with_long_names_are_read(encoder: Encoder, tmp_path: Path, form: int) -> None:
    data, d512, _ = sha512_image(tmp_path / "src")
    with tarfile.open(tmp_path / "src.tar", "w", format=form) as tar:
        for path in sorted((tmp_path / "src").rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tmp_path / "src")), recursive=False)
    ok(encoder("encrypt", "--recipient", f"jwe:{PUB}", "--layer", "1",
               f"oci-archive:{tmp_path / 'src.tar'}", f"oci:{tmp_path / 'enc'}"))
    (kept, encrypted) = Reader(tmp_path / "enc").manifest()["layers"]
    assert kept["digest"] == d512 and encrypted["mediaType"] == GZIP + "+encrypted"
    assert (tmp_path / "enc" / "blobs" / "sha512" / d512[7:]).read_bytes() == data


# --- 4. recipients, --key arguments and destinations it cannot use -------------------------


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    return bytes([tag]) + (bytes([length]) if length < 128 else bytes([0x81, length])) + content


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    body = bytes([40 * first + second])
    for part in rest:
        encoded = [part & 0x7F]
        part >>= 7
        while part:
            encoded.append(0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(reversed(encoded))
    return _der(0x06, body)


def _spki(algorithm: bytes, key: bytes) -> bytes:
    return _der(0x30, _der(0x30, algorithm) + _der(0x03, b"\x00" + key))


SM2_SPKI = _spki(_oid("1.2.840.10045.2.1") + _oid("1.2.156.10197.1.301"),
                 b"\x04" + bytes(range(1, 65)))
UNKNOWN_SPKI = _spki(_oid("1.2.3.4"), bytes(32))


def _pem(der: bytes) -> bytes:
    return (b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der)
            + b"-----END PUBLIC KEY-----\n")


UNSUPPORTED_RECIPIENTS = [
    ("sm2.pub.pem", _pem(SM2_SPKI), "Curve 1.2.156.10197.1.301 is not supported"),
    ("sm2.pub.der", SM2_SPKI, "Curve 1.2.156.10197.1.301"),
    ("unknown.pub.pem", _pem(UNKNOWN_SPKI), "1.2.3.4"),
    ("unknown.pub.der", UNKNOWN_SPKI, "1.2.3.4"),
]


@pytest.mark.parametrize(("name", "content", "reason"), UNSUPPORTED_RECIPIENTS,
                         ids=[name for name, _, _ in UNSUPPORTED_RECIPIENTS])
def test_recipient_key_of_an_unsupported_type(
    encoder: Encoder, tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    (tmp_path / name).write_bytes(content)
    before = tree_state(tmp_path)
    refused(encoder("encrypt", "--recipient", f"jwe:{tmp_path / name}",
                    f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"),
            f"recipient key {tmp_path / name} is of a type this version cannot use", reason,
            "RSA or EC")
    refused(encoder("layerinfo", "--recipient", f"jwe:{tmp_path / name}",
                    f"oci:{tmp_path / 'src'}"), reason)
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize(("fd", "says"), [
    ("99999999999999999999", ":fd={fd}: N must be the number of an open file descriptor"),
    ("x", ":fd={fd}: N must be the number of an open file descriptor"),
    ("-1", ": cannot read its password from fd={fd}: Bad file descriptor"),
    ("", ":fd={fd}: N must be the number of an open file descriptor"),
])
def test_key_password_fd_out_of_range(
    encoder: Encoder, tmp_path: Path, fd: str, says: str
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    refused(encoder("layerinfo", "--key", f"{PRIV}x:fd={fd}", f"oci:{tmp_path / 'src'}"),
            f"--key {PRIV}x" + says.format(fd=fd))
    refused(encoder("layerinfo", "--key", f"{PRIV}x:file=", f"oci:{tmp_path / 'src'}"),
            f"--key {PRIV}x:file= names no password file")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("destination", ["oci:/proc/new-layout", "oci-archive:/proc/new.tar",
                                         "oci:/sys/new-layout", "oci-archive:/sys/new.tar"])
def test_destination_in_a_pseudo_filesystem(
    encoder: Encoder, tmp_path: Path, destination: str
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    transport, _, path = destination.partition(":")
    what = "the new OCI layout" if transport == "oci" else "the oci-archive"
    refused(encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
                    destination), f"cannot write {what} {path}: ", f" in {os.path.dirname(path)}")
    assert not os.path.lexists(path)


def test_a_run_that_fails_late_prints_no_layer_results_and_names_dst(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the second layer is written: nothing is written, and stdout
    carries no 'layer 0 ... encrypted as' line claiming otherwise."""
    from decoder import layercipher

    simple_image(tmp_path / "src", random_layers(2))
    real_write_all = layercipher.write_all
    calls: list[str] = []

    def full_on_the_second_layer(fd: int, data: memoryview, what: str = "") -> None:
        calls.append(what)
        if what.startswith("the encrypted layer") and calls.count(what) == 2:
            raise OutputError(f"cannot write {what}: No space left on device")
        real_write_all(fd, data, what)

    monkeypatch.setattr(layercipher, "write_all", full_on_the_second_layer)
    result = encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
                     f"oci:{tmp_path / 'dst'}")
    refused(result, f"cannot write the encrypted layer into oci:{tmp_path / 'dst'}: No space")
    assert calls.count(calls[-1]) == 2, "the first layer was written before the failure"
    assert result.stdout == ""
    assert not (tmp_path / "dst").exists()


def test_what_it_writes_follows_the_umask_and_keeps_a_replaced_file_s_mode(
    encoder: Encoder, tmp_path: Path
) -> None:
    """Decrypted layers are plaintext: with umask 077 nothing it writes may be readable by
    others (it forced 0644 and 0755); an archive it rewrites keeps its own mode."""
    simple_image(tmp_path / "src", random_layers(2))
    ok(encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'enc'}"))
    previous = os.umask(0o077)
    try:
        ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'enc'}",
                   f"oci:{tmp_path / 'dec'}"))
        ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'enc'}",
                   f"oci-archive:{tmp_path / 'dec.tar'}"))
    finally:
        os.umask(previous)
    written = [tmp_path / "dec.tar", *(tmp_path / "dec").rglob("*"), tmp_path / "dec"]
    loose = {str(p): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o077}
    assert loose == {}
    (tmp_path / "dec.tar").chmod(0o640)
    ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'enc'}",
               f"oci-archive:{tmp_path / 'dec.tar'}:again"))
    assert (tmp_path / "dec.tar").stat().st_mode & 0o777 == 0o640
    previous = os.umask(0o077)  # a looser mode than the umask allows is not kept
    try:
        ok(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'enc'}",
                   f"oci-archive:{tmp_path / 'dec.tar'}:third"))
    finally:
        os.umask(previous)
    assert (tmp_path / "dec.tar").stat().st_mode & 0o777 == 0o600


@pytest.fixture
def unprivileged() -> Iterator[tuple[Path, list[str]]]:
    """A scratch directory and the command prefix that runs ctd-encoder without write access
    to what the test makes read-only (chmod): under root, setpriv (util-linux, in every
    Debian) drops the capabilities that override file permissions, so root stays the owner
    of the checkout wherever it lives (a 0700 mktemp clone included) but is refused writes."""
    scratch = Path(tempfile.mkdtemp(prefix="ctd-encoder-unwritable-"))
    scratch.chmod(0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is missing"
        dropped = "-dac_override,-dac_read_search,-fowner"
        prefix = [setpriv, f"--inh-caps={dropped}", f"--bounding-set={dropped}"]
        probe = subprocess.run([*prefix, str(SCRIPT), "--version"], capture_output=True,
                               check=False)
        assert probe.returncode == 0, probe.stderr
    try:
        yield scratch, prefix
    finally:
        for path in [scratch, *scratch.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(scratch)


def _read_only(path: Path) -> None:
    for item in [path, *path.rglob("*")]:
        item.chmod(0o555 if item.is_dir() else 0o444)


def test_destinations_it_cannot_write(unprivileged: tuple[Path, list[str]]) -> None:
    scratch, prefix = unprivileged
    simple_image(scratch / "src", random_layers(1))
    simple_image(scratch / "existing", random_layers(1), ref="other")
    (scratch / "ro").mkdir()
    shutil.copy(PUB, scratch / "pub.pem")
    for path in (scratch / "src", scratch / "existing", scratch / "pub.pem"):
        for item in [path, *path.rglob("*")]:
            item.chmod(0o755 if item.is_dir() else 0o644)
    _read_only(scratch / "ro")
    _read_only(scratch / "existing")
    before = tree_state(scratch)
    names = sorted(p.name for p in scratch.iterdir())
    cases = [
        (f"oci:{scratch / 'ro' / 'dst'}", f"the new OCI layout {scratch / 'ro' / 'dst'}"),
        (f"oci-archive:{scratch / 'ro' / 'dst.tar'}",
         f"the oci-archive {scratch / 'ro' / 'dst.tar'}"),
        (f"oci:{scratch / 'existing'}:new", f"into the OCI layout {scratch / 'existing'}"),
    ]
    for destination, what in cases:
        result = subprocess.run(
            [*prefix, str(SCRIPT), "encrypt", "--recipient", f"jwe:{scratch / 'pub.pem'}",
             f"oci:{scratch / 'src'}", destination],
            capture_output=True, text=True, check=False,
            env={**os.environ, "CTD_ENCODER_DEBUG": ""},
        )
        refused(Run(result.returncode, result.stdout, result.stderr),
                f"cannot write {what}: Permission denied in ")
    assert tree_state(scratch) == before
    assert sorted(p.name for p in scratch.iterdir()) == names
    assert list((scratch / "ro").iterdir()) == []


# --- 5. SIGTERM and SIGHUP mid-layer --------------------------------------------------------

ZEROS_GIB = 1 << 30
ZEROS_GIB_SHA256 = "sha256:49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"


def _large_image(root: Path) -> None:
    """An image with a 1 GiB layer of zeros, as a sparse file: made instantly, and it takes
    the encoder seconds to encrypt."""
    builder = LayoutBuilder(root)
    name = ZEROS_GIB_SHA256.partition(":")[2]
    with open(root / "blobs" / "sha256" / name, "wb") as f:
        f.truncate(ZEROS_GIB)
    builder.add(manifest_of(builder, [{"mediaType": GZIP, "digest": ZEROS_GIB_SHA256,
                                       "size": ZEROS_GIB}]))


def _partial_bytes(tmp_path: Path) -> int:
    """How much of a partial blob (or archive) the encoder has written so far."""
    found = [*tmp_path.glob(".*.partial"), *tmp_path.glob(".*.partial/blobs/.partial-*"),
             *tmp_path.glob("existing/blobs/.partial-*")]
    return max((p.stat().st_size for p in found if p.is_file()), default=0)


@pytest.mark.parametrize(("destination", "stop"), [
    ("oci:{tmp}/dst", signal.SIGTERM),
    ("oci-archive:{tmp}/dst.tar", signal.SIGTERM),
    ("oci:{tmp}/existing:enc", signal.SIGTERM),
    ("oci:{tmp}/dst", signal.SIGHUP),
])
def test_a_stop_signal_mid_layer_leaves_nothing(
    tmp_path: Path, destination: str, stop: signal.Signals
) -> None:
    _large_image(tmp_path / "src")
    simple_image(tmp_path / "existing", random_layers(1), ref="other")
    before = tree_state(tmp_path / "existing")
    names = sorted(p.name for p in tmp_path.iterdir())
    process = subprocess.Popen(
        [SCRIPT, "encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
         destination.format(tmp=tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 8
    while _partial_bytes(tmp_path) < 16 << 20 and process.poll() is None:
        assert time.monotonic() < deadline, "the encoder never got going"
        time.sleep(0.01)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=10)
    refused(Run(process.returncode, "", stderr),
            f"terminated by {stop.name}; nothing was written", status=128 + stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert tree_state(tmp_path / "existing") == before


@pytest.mark.parametrize("destination", ["oci:{tmp}/dst", "oci-archive:{tmp}/dst.tar",
                                         "oci:{tmp}/existing:other"])
def test_a_stop_signal_during_the_commit_is_not_reported_as_nothing_written(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, destination: str
) -> None:
    """SIGTERM while index.json (or the archive) is being put in place is held until the
    commit is done; the image is then complete, and the run must say so, not 'nothing was
    written'."""
    simple_image(tmp_path / "src", random_layers(1))
    simple_image(tmp_path / "existing", random_layers(1), ref="other")
    real_replace = os.replace

    def replace_then_signal(source: str, target: str) -> None:
        real_replace(source, target)
        if str(target).endswith(("index.json", "dst.tar")):  # the commit's own replace
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ocilayout.os, "replace", replace_then_signal)
    where = destination.format(tmp=tmp_path)
    result = ok(encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
                        where))
    assert "SIGTERM came while" in result.stderr and "written in full" in result.stderr
    assert "nothing was written" not in result.stderr
    assert f"wrote {where}" in result.stdout
    monkeypatch.setattr(ocilayout.os, "replace", real_replace)
    info = ok(encoder("layerinfo", "--json", where)).stdout
    assert all(layer["encrypted"] for m in json.loads(info)["manifests"] for layer in m["layers"])


def test_a_stop_signal_while_the_results_print_says_the_image_was_written(
    encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from decoder import encode_cli

    simple_image(tmp_path / "src", random_layers(2))
    real_say = encode_cli.TerminalReporter.say

    def say_then_stop(self: Any, text: str) -> None:
        real_say(self, text)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(encode_cli.TerminalReporter, "say", say_then_stop)
    result = encoder("encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
                     f"oci:{tmp_path / 'dst'}")
    refused(result, f"terminated by SIGTERM; oci:{tmp_path / 'dst'} had been written in full",
            status=143)
    assert Reader(tmp_path / "dst").manifest()["layers"][0]["mediaType"].endswith("+encrypted")


def test_payload_to_a_closed_or_full_stdout_is_one_line(tmp_path: Path) -> None:
    layer = encrypt_layer(os.urandom(5000), [PUB])
    builder = LayoutBuilder(tmp_path / "src")
    builder.blob(layer.ciphertext)
    builder.add(manifest_of(builder, [layer.descriptor]))
    for redirect in (">&-", ">/dev/full"):
        done = subprocess.run(["/bin/bash", "-c", f'"$@" {redirect}', "sh", str(SCRIPT),
                               "payload", "--layer", "0", f"oci:{tmp_path / 'src'}"],
                              capture_output=True, text=True, check=False)
        refused(Run(done.returncode, "", done.stderr), "cannot write the payload to stdout: ",
                "give -o FILE")


def test_a_closed_stdout_or_stderr_at_start(tmp_path: Path) -> None:
    layer = encrypt_layer(os.urandom(5000), [PUB])
    builder = LayoutBuilder(tmp_path / "src")
    builder.blob(layer.ciphertext)
    builder.add(manifest_of(builder, [layer.descriptor]))
    source = f"oci:{tmp_path / 'src'}"

    def run_with(redirect: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/bash", "-c", f'exec "$@" {redirect}', "sh", str(SCRIPT),
                               *args], capture_output=True, text=True, check=False)

    closed_stdout = run_with(">&-", "layerinfo", source)
    refused(Run(closed_stdout.returncode, "", closed_stdout.stderr),
            "cannot write the results: stdout (fd 1) is closed")
    closed_stderr = run_with("2>&-", "layerinfo", source)
    assert closed_stderr.returncode == 0 and "not encrypted" not in closed_stderr.stdout
    assert str(layer.descriptor["digest"]) in closed_stderr.stdout
    failing = run_with("2>&-", "layerinfo", f"oci:{tmp_path / 'missing'}")
    assert (failing.returncode, failing.stdout, failing.stderr) == (1, "", "")
    payload_file = tmp_path / "payload.bin"
    to_file = run_with(">&-", "payload", "--layer", "0", "-o", str(payload_file), source)
    assert to_file.returncode == 0, to_file.stderr
    assert payload_file.stat().st_size > 0


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """`nohup ctd-encoder ...`: a hangup must not stop the run."""
    _large_image(tmp_path / "src")
    process = subprocess.Popen(
        [SCRIPT, "encrypt", "--recipient", f"jwe:{PUB}", f"oci:{tmp_path / 'src'}",
         f"oci:{tmp_path / 'dst'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    deadline = time.monotonic() + 8
    while _partial_bytes(tmp_path) < 16 << 20 and process.poll() is None:
        assert time.monotonic() < deadline, "the encoder never got going"
        time.sleep(0.01)
    process.send_signal(signal.SIGHUP)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"wrote oci:{tmp_path / 'dst'}" in stdout


def test_a_password_fd_that_is_a_terminal_is_refused(encoder: Encoder, tmp_path: Path) -> None:
    import pty

    simple_image(tmp_path / "src", random_layers(1))
    controller, terminal = pty.openpty()
    try:
        refused(encoder("layerinfo", "--key", f"{PRIV}:fd={terminal}", f"oci:{tmp_path / 'src'}"),
                f"--key {PRIV}:fd={terminal} is a terminal, where the password would show")
    finally:
        os.close(controller)
        os.close(terminal)


# --- 6. a reader that closes stdout early ---------------------------------------------------


@pytest.mark.parametrize("form", [["--json"], []])
def test_stdout_closed_early_is_exit_1_quietly(tmp_path: Path, form: list[str]) -> None:
    """`ctd-encoder layerinfo | head -c 1`: the encoder's own status is 1, not 0 with its
    output cut short, and it says nothing (a buffered stdout lost the EPIPE after a partial
    write, so it exited 0)."""
    simple_image(tmp_path / "src", random_layers(1500, 10))
    process = subprocess.Popen([SCRIPT, "layerinfo", *form, f"oci:{tmp_path / 'src'}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    assert len(process.stdout.read(1)) == 1
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=30) == 1
    assert stderr == b""


def test_layerinfo_text_escapes_control_characters(encoder: Encoder, tmp_path: Path) -> None:
    hostile = "application/x\x1b[2J\nforged line"
    simple_image(tmp_path / "src", [Layer(os.urandom(100), hostile)])
    text = ok(encoder("layerinfo", f"oci:{tmp_path / 'src'}")).stdout
    assert "\x1b" not in text
    assert not any(line.startswith("forged") for line in text.splitlines())
    assert "application/x\\x1b[2J\\nforged line" in text


# --- 7. the wrapped plaintext digest is never shown -----------------------------------------


def _layer_with_digest(root: Path, plaintext_digest: str) -> None:
    layer = encrypt_layer(os.urandom(5000), [PUB], private={"digest": plaintext_digest})
    builder = LayoutBuilder(root)
    builder.blob(layer.ciphertext)
    builder.add(manifest_of(builder, [layer.descriptor]))


def test_a_sha384_plaintext_digest_is_named_not_shown(encoder: Encoder, tmp_path: Path) -> None:
    secret = hashlib.sha384(os.urandom(100)).hexdigest()
    _layer_with_digest(tmp_path / "src", "sha384:" + secret)
    line = refused(encoder("decrypt", "--key", PRIV, f"oci:{tmp_path / 'src'}",
                           f"oci:{tmp_path / 'dst'}"),
                   "plaintext digest in sha384", "sha256 or sha512 only", "nothing was written")
    assert secret[:16] not in line
    assert not (tmp_path / "dst").exists()
    # adding a recipient keeps the options as they are, whatever their digest algorithm
    result = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--key", PRIV,
                        f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'two'}"))
    assert secret[:16] not in result.stdout + result.stderr
    info = json.loads(ok(encoder("layerinfo", "--json", "--key", KEYS / "ec256-pkcs8.pem",
                                 f"oci:{tmp_path / 'two'}")).stdout)
    assert info["manifests"][0]["layers"][0]["openedBy"] == [str(KEYS / "ec256-pkcs8.pem")]


BAD_DIGESTS = [
    ("sha256:" + "Zq" * 32, "the sha256 plaintext digest in its private options is malformed"),
    ("sha256:" + "ab" * 31, "the sha256 plaintext digest in its private options is malformed"),
    ("md5:" + "ab" * 16, "in the unknown algorithm 'md5'"),
    ("secret-without-algorithm-" + "cd" * 20, "in a malformed digest"),
    ("S3CRET:" + "ef" * 32, "in a malformed digest"),
]


@pytest.mark.parametrize(("plaintext_digest", "named"), BAD_DIGESTS,
                         ids=["not hex", "too short", "md5", "no algorithm", "not an algorithm"])
def test_a_malformed_plaintext_digest_is_not_shown(
    encoder: Encoder, tmp_path: Path, plaintext_digest: str, named: str
) -> None:
    _layer_with_digest(tmp_path / "src", plaintext_digest)
    secret = plaintext_digest.partition(":")[2] or plaintext_digest
    for command in (["decrypt", "--key", str(PRIV)],
                    ["encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--key",
                     str(PRIV)]):
        line = refused(encoder(*command, f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"),
                       named)
        assert secret not in line and secret[:12] not in line
        assert "S3CRET" not in line
    assert not (tmp_path / "dst").exists()
    # layerinfo --key says the key does not open it, and shows nothing of the digest either
    result = ok(encoder("layerinfo", "--key", PRIV, f"oci:{tmp_path / 'src'}"))
    assert secret[:12] not in result.stdout + result.stderr


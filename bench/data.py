"""Benchmark material: a key pair and skopeo-encrypted images, cached outside the repository.

The cache lives in $PYIMGCRYPT_BENCH_CACHE, else $XDG_CACHE_HOME/pyimgcrypt-bench, else
~/.cache/pyimgcrypt-bench. Each image is built once with the integration harness (umoci:
busybox and a unique marker in layer 0) plus one layer holding a file of random bytes of the
requested size (umoci insert), then encrypted for the cached RSA key with
`skopeo copy --encryption-key jwe:PUB`. The random layer (index 1) is the one the decoder
benchmarks feed to the decoders; the whole image serves the encoder and CRI benchmarks.

An image is built in a scratch directory and renamed into place when complete; on reuse, the
blob sizes and SHA-256 digests of its random layer (plain and encrypted) are checked against
the manifests, and an image that fails the check is built again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
from tests.support import payload_bytes

from bench import MIB
from bench.measure import BenchError

FORMAT = "v1"
TAG = "latest"
RANDOM_LAYER = 1
RANDOM_FILE = "/bench/random.bin"


def cache_root() -> Path:
    explicit = os.environ.get("PYIMGCRYPT_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyimgcrypt-bench"


@dataclass(frozen=True)
class Keys:
    """The node's key directory (holding key.pem), the private key file, the public key."""

    directory: Path
    private: Path
    public: Path


def keys(root: Path) -> Keys:
    """An RSA-2048 key pair (PKCS#8 PEM), made once with the harness's openssl recipe."""
    home = root / FORMAT / "keys"
    result = Keys(home / "node", home / "node" / "key.pem", home / "public.pem")
    if result.private.is_file() and result.public.is_file():
        return result
    shutil.rmtree(home, ignore_errors=True)
    pair = harness.make_key(home / "gen", "rsa", "pkcs8-pem")
    harness.write_key_files(result.directory, pair.files)
    result.directory.chmod(0o700)
    shutil.copyfile(pair.public_pem, result.public)
    shutil.rmtree(home / "gen")
    return result


@dataclass(frozen=True)
class BenchImage:
    """A cached image: its plain and skopeo-encrypted OCI layouts and their layer descriptors."""

    label: str
    requested: int  # the random layer's nominal size in bytes
    directory: Path
    plain_layers: list[dict[str, Any]]
    encrypted_layers: list[dict[str, Any]]
    markers: dict[str, str]

    @property
    def plain(self) -> Path:
        return self.directory / "plain.oci"

    @property
    def encrypted(self) -> Path:
        return self.directory / "encrypted.oci"

    def local(self) -> harness.LocalImage:
        """The plain image as the integration harness describes it."""
        return harness.read_layout(self.plain, TAG, dict(self.markers))

    # the random layer, which the decoder benchmarks use

    @property
    def descriptor(self) -> dict[str, Any]:
        return self.encrypted_layers[RANDOM_LAYER]

    @property
    def ciphertext(self) -> Path:
        return blob_path(self.encrypted, self.descriptor["digest"])

    @property
    def size(self) -> int:
        return int(self.descriptor["size"])

    @property
    def plaintext_digest(self) -> str:
        return str(self.plain_layers[RANDOM_LAYER]["digest"])

    @property
    def plaintext(self) -> Path:
        """The plain layer's blob: what a decoder must write, byte for byte."""
        return blob_path(self.plain, self.plaintext_digest)

    @property
    def plaintext_size(self) -> int:
        return int(self.plain_layers[RANDOM_LAYER]["size"])

    def payload(self) -> bytes:
        """The fd-3 payload containerd would hand a decoder for the random layer."""
        return payload_bytes(self.descriptor)


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def manifest_layers(layout: Path, tag: str = TAG) -> list[dict[str, Any]]:
    """The layer descriptors of `tag` in an OCI layout."""
    index = json.loads((layout / "index.json").read_bytes())
    entries = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(entries) != 1:
        raise BenchError(f"{layout}: expected one manifest tagged {tag}, found {len(entries)}")
    manifest = json.loads(blob_path(layout, entries[0]["digest"]).read_bytes())
    layers: list[dict[str, Any]] = manifest["layers"]
    return layers


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def size_label(size: int) -> str:
    if size >= 1024 * MIB and size % (1024 * MIB) == 0:
        return f"{size // (1024 * MIB)} GiB"
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size // 1024} KiB"


def image(root: Path, size: int, key: Keys, log: Any = print, files: bool = False) -> BenchImage:
    """The cached image whose second layer holds about `size` bytes of random data (one file)
    or, with `files`, of text-like files (see _write_files); built when missing or bad."""
    label = size_label(size).replace(" ", "") + ("-files" if files else "")
    directory = root / FORMAT / "images" / label
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            found = BenchImage(label, int(meta["requested_size"]), directory,
                               meta["plain_layers"], meta["encrypted_layers"], meta["markers"])
            if meta.get("public_key_sha256") == file_sha256(key.public):
                _verify(found)
                return found
            log(f"bench data: {label} image was encrypted for another key; rebuilding")
        except (OSError, KeyError, ValueError, BenchError) as e:
            log(f"bench data: cached {label} image unusable ({e}); rebuilding")
    return _build(directory, label, size, key, log, files)


def _verify(found: BenchImage) -> None:
    for layout, descriptor in ((found.plain, found.plain_layers[RANDOM_LAYER]),
                               (found.encrypted, found.descriptor)):
        path = blob_path(layout, descriptor["digest"])
        if not path.is_file() or path.stat().st_size != descriptor["size"]:
            raise BenchError(f"{path} is missing or has the wrong size")
        if file_sha256(path) != descriptor["digest"]:
            raise BenchError(f"{path} does not match its digest")
    if manifest_layers(found.encrypted) != found.encrypted_layers:
        raise BenchError("the encrypted layout's manifest changed")


def _write_random(stage: Path, size: int) -> None:
    target = stage / RANDOM_FILE.lstrip("/")
    target.parent.mkdir(parents=True)
    with target.open("wb") as f:  # the tar header and gzip framing add the rest
        remaining = max(size - 1536, 1)
        while remaining:
            chunk = os.urandom(min(remaining, 4 * MIB))
            f.write(chunk)
            remaining -= len(chunk)


def _write_files(stage: Path, size: int) -> None:
    """About `size` bytes of text-like files, 1-64 KiB each, 100 to a directory: lines of
    words from a fixed vocabulary, which gzip shrinks about 3x, much as it does the files of a
    typical application image. Seeded, so every machine builds the same tree."""
    import random

    rng = random.Random(20261203)  # noqa: S311 - reproducible test data, not a secret
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    written = index = 0
    while written < size:
        length = min(rng.randint(1024, 64 * 1024), max(size - written, 1))
        words = rng.choices(vocabulary, k=length // 5 + 1)
        text = "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))
        body = text.encode()[:length]
        target = stage / "bench" / "files" / f"d{index // 100:03d}" / f"f{index:05d}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        written += len(body)
        index += 1


def _build(
    directory: Path, label: str, size: int, key: Keys, log: Any, files: bool = False
) -> BenchImage:
    log(f"bench data: building the {label} image (umoci, skopeo encrypt) in {directory}")
    scratch = directory.with_name(directory.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    scratch.mkdir(parents=True)
    marker = harness.unique_marker(f"bench {label}")
    local = harness.build_image(scratch, "plain", [{"/bench/marker": marker}])
    stage = scratch / "stage"
    (_write_files if files else _write_random)(stage, size)
    harness.run(["umoci", "insert", "--image", f"{local.layout}:{TAG}", stage, "/"], timeout=600)
    shutil.rmtree(stage)
    encrypted = scratch / "encrypted.oci"
    harness.run(["skopeo", "copy", "--quiet", "--policy", harness.policy_file(scratch),
                 "--encryption-key", f"jwe:{key.public}", f"oci:{local.layout}:{TAG}",
                 f"oci:{encrypted}:{TAG}"], timeout=600)
    meta: dict[str, Any] = {
        "label": label,
        "requested_size": size,
        "plain_layers": manifest_layers(local.layout),
        "encrypted_layers": manifest_layers(encrypted),
        "markers": {"/bench/marker": marker},
        "public_key_sha256": file_sha256(key.public),
    }
    if len(meta["plain_layers"]) != 2 or len(meta["encrypted_layers"]) != 2:
        raise BenchError(f"the {label} image should have two layers")
    (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
    scratch.rename(directory)
    built = BenchImage(label, size, directory, meta["plain_layers"], meta["encrypted_layers"],
                       meta["markers"])
    _verify(built)
    return built

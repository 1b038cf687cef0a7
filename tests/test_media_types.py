"""ctd-decoder on every encrypted layer media type it claims, started as containerd starts it
(payload on fd 3, ciphertext on stdin), and on media types it must refuse."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from decoder.spec import ENCRYPTED_TO_PLAIN
from tests.support import KEYS, encrypt_layer, key_dir, payload_bytes, run_decoder

OCI = "application/vnd.oci.image.layer.v1.tar"
NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar"

# Written out from the OCI image spec and ocicrypt, not taken from decoder.spec, so that a
# type dropped from (or misspelt in) the decoder's table fails here.
ENCRYPTED_TYPES = [
    f"{OCI}+encrypted",
    f"{OCI}+gzip+encrypted",
    f"{OCI}+zstd+encrypted",
    f"{NONDIST}+encrypted",
    f"{NONDIST}+gzip+encrypted",
    f"{NONDIST}+zstd+encrypted",
    f"{DOCKER}+encrypted",
    f"{DOCKER}.gzip+encrypted",
]


def tar_bytes(size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return raw.getvalue()


def zstd_frame(data: bytes) -> bytes:
    """A valid zstd frame holding `data` in raw (stored) blocks (RFC 8878): no FCS, a 128 KiB
    window, no checksum. Enough to make a zstd layer without a zstd library."""
    block = 128 * 1024
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out += bytes([0x00, 7 << 3])  # frame header descriptor, window descriptor (2^(10+7))
    chunks = [data[i : i + block] for i in range(0, len(data), block)] or [b""]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        out += (int(last) | (0 << 1) | (len(chunk) << 3)).to_bytes(3, "little") + chunk
    return bytes(out)


def plaintext_for(media_type: str) -> bytes:
    """A layer of the kind the media type names, larger than the decoder's 64 KiB hold-back."""
    tar = tar_bytes(300_000)
    plain = media_type.removesuffix("+encrypted")
    if plain.endswith(("+gzip", ".gzip")):
        return gzip.compress(tar, mtime=0)
    if plain.endswith("+zstd"):
        return zstd_frame(tar)
    return tar


def test_the_decoder_table_is_exactly_these_types() -> None:
    assert sorted(ENCRYPTED_TO_PLAIN) == sorted(ENCRYPTED_TYPES)
    for encrypted, plain in ENCRYPTED_TO_PLAIN.items():
        assert plain == encrypted.removesuffix("+encrypted")


@pytest.mark.parametrize("media_type", ENCRYPTED_TYPES)
def test_every_encrypted_media_type_decrypts(media_type: str, tmp_path: Path) -> None:
    plaintext = plaintext_for(media_type)
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"], media_type=media_type)
    assert layer.descriptor["mediaType"] == media_type
    args = ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-sec1.pem"))]
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == plaintext


REFUSED_TYPES = [
    f"{OCI}+gzip",  # a plain layer: containerd should not have sent it to a decoder
    OCI,
    f"{DOCKER}.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip+encrypted",
    "application/vnd.oci.image.layer.v1.tar+bzip2+encrypted",
    "application/octet-stream",
    f"{OCI}+gzip+encrypted ",  # no trimming: the type must match exactly
    f"{OCI.upper()}+GZIP+ENCRYPTED",
]


@pytest.mark.parametrize("media_type", REFUSED_TYPES)
def test_other_media_types_are_refused(media_type: str, tmp_path: Path) -> None:
    plaintext = plaintext_for(f"{OCI}+gzip+encrypted")
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"], media_type=media_type)
    args = ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-sec1.pem"))]
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(
        f"ctd-decoder: layer media type {media_type} is not an encrypted layer type"
    )
    assert "ending in +encrypted" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")


def test_a_descriptor_without_a_media_type_is_refused(tmp_path: Path) -> None:
    layer = encrypt_layer(tar_bytes(1000), [KEYS / "ec256.pub.pem"])
    descriptor = {k: v for k, v in layer.descriptor.items() if k != "mediaType"}
    args = ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-sec1.pem"))]
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith("ctd-decoder: layer media type (none) is not an encrypted")
    assert result.stderr.count("\n") == 1


# --- STREAM_PROCESSOR_MEDIATYPE: containerd's view of the layer type, beside the payload's ----

MEDIA_TYPE_ENV = "STREAM_PROCESSOR_MEDIATYPE"


@pytest.mark.parametrize(
    "passed",
    [f"{OCI}+gzip+encrypted", f"{OCI}+gzip", "application/octet-stream", ""],
)
def test_the_descriptor_media_type_decides_not_the_env(passed: str, tmp_path: Path) -> None:
    """containerd sets STREAM_PROCESSOR_MEDIATYPE to the type it matched the processor by;
    the decoder goes by the descriptor in the payload, so a disagreement does not stop it."""
    media_type = f"{OCI}+zstd+encrypted"
    plaintext = plaintext_for(media_type)
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"], media_type=media_type)
    args = ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-sec1.pem"))]
    result = run_decoder(
        layer.ciphertext, payload_bytes(layer.descriptor), args, env={MEDIA_TYPE_ENV: passed}
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == plaintext


def refused_with_env(media_type: str, passed: str | None, tmp_path: Path) -> str:
    layer = encrypt_layer(tar_bytes(1000), [KEYS / "ec256.pub.pem"], media_type=media_type)
    args = ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-sec1.pem"))]
    env = {} if passed is None else {MEDIA_TYPE_ENV: passed}
    assert passed is not None or MEDIA_TYPE_ENV not in os.environ
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args, env=env)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(
        f"ctd-decoder: layer media type {media_type} is not an encrypted layer type"
    )
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    return result.stderr


@pytest.mark.parametrize(
    ("media_type", "passed"),
    [
        (f"{OCI}+gzip", f"{OCI}+gzip+encrypted"),
        ("application/vnd.wasm.content.layer.v1+wasm+encrypted", f"{OCI}+encrypted"),
        (f"{OCI}+gzip", "application/octet-stream"),
    ],
)
def test_an_unsupported_type_names_what_containerd_passed_when_they_differ(
    media_type: str, passed: str, tmp_path: Path
) -> None:
    line = refused_with_env(media_type, passed, tmp_path)
    assert f"(containerd passed {MEDIA_TYPE_ENV}={passed})" in line
    assert line.count(MEDIA_TYPE_ENV) == 1


@pytest.mark.parametrize("passed", [None, "", f"{OCI}+gzip"], ids=["unset", "empty", "same"])
def test_the_env_is_not_mentioned_when_it_agrees_or_is_absent(
    passed: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MEDIA_TYPE_ENV, raising=False)
    line = refused_with_env(f"{OCI}+gzip", passed, tmp_path)
    assert MEDIA_TYPE_ENV not in line


def test_a_hostile_env_value_stays_on_one_line(tmp_path: Path) -> None:
    line = refused_with_env(f"{OCI}+gzip", "x\ny\x1b[31m", tmp_path)
    assert f"(containerd passed {MEDIA_TYPE_ENV}=x\\ny\\x1b[31m)" in line
    assert "\x1b" not in line

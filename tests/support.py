"""Test support: an independent ocicrypt layer encryptor (jwcrypto + cryptography), fd-3
payload framing, and a runner that starts ctd-decoder as containerd does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import platform
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from jwcrypto import jwe, jwk

ASSETS = Path(__file__).parent / "assets"
KEYS = ASSETS / "keys"
GZIP_ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
TAR_ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+encrypted"
JWE_ANNOTATION = "org.opencontainers.image.enc.keys.jwe"
PUBOPTS = "org.opencontainers.image.enc.pubopts"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def any_bytes(value: bytes, type_url: str = "io.containerd.ocicrypt.v1.Payload") -> bytes:
    url = type_url.encode()
    return b"\x0a" + varint(len(url)) + url + b"\x12" + varint(len(value)) + value


def payload_bytes(descriptor: dict[str, Any], parameters: dict[str, Any] | None = None) -> bytes:
    body = {"DecryptConfig": {"Parameters": parameters}, "Descriptor": descriptor}
    return any_bytes(json.dumps(body).encode())


def public_jwk(path: Path) -> jwk.JWK:
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        return jwk.JWK.from_json(data)
    return jwk.JWK.from_pem(data)


@dataclass
class EncryptedLayer:
    ciphertext: bytes
    descriptor: dict[str, Any]
    plaintext: bytes


def encrypt_layer(
    plaintext: bytes,
    recipients: list[Path],
    *,
    algs: list[str] | None = None,
    enc: str = "A256GCM",
    compact: bool = False,
    media_type: str = GZIP_ENCRYPTED,
    private: dict[str, Any] | None = None,
    public: dict[str, Any] | None = None,
    symkey: bytes | None = None,
    nonce: bytes | None = None,
) -> EncryptedLayer:
    """Encrypt a layer the way ocicrypt does, independently of the code under test.
    `private`/`public` override fields of the options JSON (None values delete them)."""
    key = symkey if symkey is not None else os.urandom(32)
    iv = nonce if nonce is not None else os.urandom(16)
    encryptor = Cipher(
        algorithms.AES(key[:32].ljust(32, b"\0")), modes.CTR(iv.ljust(16, b"\0")[:16])
    ).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    mac = hmac.new(key, ciphertext, "sha256").digest()
    priv: dict[str, Any] = {
        "symkey": b64(key),
        "digest": "sha256:" + hashlib.sha256(plaintext).hexdigest(),
        "cipheroptions": {"nonce": b64(iv)},
    }
    pub: dict[str, Any] = {
        "cipher": "AES_256_CTR_HMAC_SHA256",
        "hmac": b64(mac),
        "cipheroptions": {},
    }
    for target, overrides in ((priv, private), (pub, public)):
        for name, value in (overrides or {}).items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = value
    wrapped = wrap_jwe(json.dumps(priv).encode(), recipients, algs=algs, enc=enc, compact=compact)
    descriptor = {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(ciphertext).hexdigest(),
        "size": len(ciphertext),
        "annotations": {JWE_ANNOTATION: b64(wrapped), PUBOPTS: b64(json.dumps(pub).encode())},
    }
    return EncryptedLayer(ciphertext, descriptor, plaintext)


def wrap_jwe(
    plaintext: bytes,
    recipients: list[Path],
    *,
    algs: list[str] | None = None,
    enc: str = "A256GCM",
    compact: bool = False,
) -> bytes:
    keys = [public_jwk(p) for p in recipients]
    chosen = algs or ["RSA-OAEP" if k["kty"] == "RSA" else "ECDH-ES+A256KW" for k in keys]
    allowed = [*chosen, enc]
    if compact:
        token = jwe.JWE(plaintext, protected=json.dumps({"alg": chosen[0], "enc": enc}))
        token.allowed_algs = allowed
        token.add_recipient(keys[0])
        return token.serialize(compact=True).encode()
    token = jwe.JWE(plaintext, protected=json.dumps({"enc": enc}))
    token.allowed_algs = allowed
    for key, alg in zip(keys, chosen, strict=True):
        token.add_recipient(key, header=json.dumps({"alg": alg}))
    return token.serialize().encode()


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def decoder_command() -> list[str]:
    return [sys.executable, "-m", "decoder"]


def run_decoder(
    stdin: bytes,
    payload: bytes | None,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Result:
    """Run ctd-decoder as containerd does: payload on fd 3 (absent when None), stdin, stdout."""
    cmd = command or decoder_command()
    full_env = {**os.environ, **(env or {})}
    full_env.pop("CTD_DECODER_DEBUG", None)
    if payload is None:
        proc = subprocess.run(
            ["/bin/bash", "-c", 'exec 3<&-; exec "$@"', "sh", *cmd, *args],
            input=stdin,
            capture_output=True,
            env=full_env,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr.decode())
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as f:
            try:
                f.write(payload)
            except BrokenPipeError:
                pass

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        proc = subprocess.run(
            ["/bin/bash", "-c", f'{_move_to_fd3(read_end)}exec "$@"', "sh", *cmd, *args],
            input=stdin,
            capture_output=True,
            env=full_env,
            pass_fds=(read_end,),
            check=False,
        )
    finally:
        os.close(read_end)
        writer.join()
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


def _move_to_fd3(fd: int) -> str:
    return "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "


def key_dir(tmp: Path, *names: str) -> Path:
    """A key directory holding copies of the named assets."""
    directory = tmp / "keys"
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes((KEYS / name).read_bytes())
    return directory


def skopeo_fixture(name: str) -> tuple[bytes, dict[str, Any], str]:
    """A skopeo-encrypted layer: (ciphertext, descriptor, plaintext digest)."""
    descriptor = json.loads((ASSETS / "skopeo" / f"{name}.json").read_text())
    plaintext_digest = descriptor.pop("x-plaintext-digest")
    descriptor.pop("x-uncompressed-digest", None)
    return (ASSETS / "skopeo" / f"{name}.blob").read_bytes(), descriptor, plaintext_digest


def cpu_has_sha_extensions() -> bool:
    """Whether this CPU has the x86 SHA extensions that decoder._sha256pair needs."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return "sha_ni" in line.split()
    return False

"""ctd-decoder end to end, started as containerd starts it: payload on fd 3, ciphertext on
stdin. Layers come from skopeo (committed fixtures) or from tests.support's own encryptor."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from decoder import __version__, layercipher
from tests.support import (
    JWE_ANNOTATION,
    KEYS,
    PUBOPTS,
    TAR_ENCRYPTED,
    any_bytes,
    b64,
    encrypt_layer,
    key_dir,
    payload_bytes,
    run_decoder,
    skopeo_fixture,
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def args_for(directory: Path) -> list[str]:
    return ["--decryption-keys-path", str(directory)]


@pytest.mark.parametrize(
    ("fixture", "key"),
    [
        ("rsa2048", "rsa2048-pkcs1.pem"),
        ("rsa2048", "rsa2048-pkcs8.pem"),
        ("rsa2048", "rsa2048-pkcs1.der"),
        ("rsa2048", "rsa2048-pkcs8.der"),
        ("rsa2048", "rsa2048.jwk.json"),
        ("rsa4096", "rsa4096-pkcs8.pem"),
        ("ec256", "ec256-sec1.pem"),
        ("ec256", "ec256-pkcs8.pem"),
        ("ec256", "ec256-sec1.der"),
        ("ec256", "ec256.jwk.json"),
        ("ec384", "ec384-sec1.pem"),
        ("ec521", "ec521-sec1.pem"),
        ("ec521", "ec521-pkcs8.pem"),
        ("two-recipients", "rsa2048-pkcs1.pem"),
        ("two-recipients", "ec384-pkcs8.pem"),
        ("zstd", "ec256-sec1.pem"),
    ],
)
def test_skopeo_layers_decrypt(fixture: str, key: str, tmp_path: Path) -> None:
    ciphertext, descriptor, plaintext_digest = skopeo_fixture(fixture)
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(key_dir(tmp_path, key)))
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == plaintext_digest


@pytest.mark.parametrize("fixture", ["zstd-recompressed", "tar-recompressed"])
def test_skopeo_recompressed_layers_need_explicit_trust(fixture: str, tmp_path: Path) -> None:
    # skopeo records the source blob's digest when it recompresses while encrypting.
    ciphertext, descriptor, plaintext_digest = skopeo_fixture(fixture)
    args = args_for(key_dir(tmp_path, "ec256-sec1.pem"))
    strict = run_decoder(ciphertext, payload_bytes(descriptor), args)
    assert_failed(strict, "does not match the sha256 digest", "--accept-digest-mismatch")
    assert strict.stdout == b""  # smaller than the hold-back: nothing is released
    trusting = run_decoder(
        ciphertext, payload_bytes(descriptor), [*args, "--accept-digest-mismatch"]
    )
    assert trusting.returncode == 0
    assert "warning: the decrypted layer does not match the sha256 digest" in trusting.stderr
    assert len(trusting.stdout) == len(ciphertext)
    if plaintext_digest:
        assert sha256(trusting.stdout) == plaintext_digest
    else:
        expected = json.loads(
            (Path(__file__).parent / "assets" / "skopeo" / f"{fixture}.json").read_text()
        )
        assert sha256(gzip.decompress(trusting.stdout)) == expected["x-uncompressed-digest"]


def test_flag_forms_and_repeats(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = skopeo_fixture("two-recipients")
    empty = tmp_path / "empty"
    empty.mkdir()
    keys = key_dir(tmp_path, "ec384-sec1.pem")
    for args in (
        ["-decryption-keys-path", str(keys)],
        [f"--decryption-keys-path={keys}"],
        ["--decryption-keys-path", str(empty), f"-decryption-keys-path={keys}"],
    ):
        result = run_decoder(ciphertext, payload_bytes(descriptor), args)
        assert result.returncode == 0, result.stderr
        assert sha256(result.stdout) == digest


def test_payload_keys_with_password(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = skopeo_fixture("rsa2048")
    params = {
        "privkeys": [b64((KEYS / "rsa2048-legacy-encrypted.pem").read_bytes())],
        "privkeys-passwords": [b64(b"s3cret")],
    }
    result = run_decoder(ciphertext, payload_bytes(descriptor, params), [])
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == digest


def test_directory_password_sidecar(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = skopeo_fixture("rsa2048")
    keys = key_dir(tmp_path, "rsa2048-pkcs8-encrypted.pem")
    (keys / "rsa2048-pkcs8-encrypted.pem.password").write_text("s3cret\n")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert result.returncode == 0, result.stderr
    assert sha256(result.stdout) == digest


def test_stray_files_do_not_break_decryption(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = skopeo_fixture("ec256")
    keys = key_dir(tmp_path, "rsa2048.pub.pem", "ec256-sec1.pem", "rsa2048-pkcs8-encrypted.pem")
    (keys / "README").write_text("node keys\n")
    (keys / "empty").write_bytes(b"")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def test_secret_volume_layout(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = skopeo_fixture("ec521")
    keys = tmp_path / "secret"
    (keys / "..2026_12_03").mkdir(parents=True)
    (keys / "..2026_12_03" / "node.pem").write_bytes((KEYS / "ec521-sec1.pem").read_bytes())
    (keys / "..data").symlink_to("..2026_12_03")
    (keys / "node.pem").symlink_to("..data/node.pem")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def assert_failed(result: object, *fragments: str, plaintext: bytes | None = None) -> None:
    """Exit 1, one `ctd-decoder: ` line holding the fragments, no traceback; and stdout empty,
    or (with `plaintext`, for failures found after release began) never the whole layer."""
    from tests.support import Result

    assert isinstance(result, Result)
    assert result.returncode == 1
    assert result.stderr.startswith("ctd-decoder: ") and result.stderr.endswith("\n")
    assert result.stderr.count("\n") == 1, "one line on stderr"
    for fragment in fragments:
        assert fragment in result.stderr
    if plaintext is None:
        assert result.stdout == b"", f"{len(result.stdout)} bytes on stdout"
    else:
        assert result.stdout != plaintext and len(result.stdout) < len(plaintext)
    assert "Traceback" not in result.stderr


def test_wrong_key_lists_what_was_tried_and_skipped(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("two-recipients")
    keys = key_dir(tmp_path, "other-rsa2048.pem", "ec256-sec1.pem", "rsa2048.pub.pem")
    (keys / "notes.txt").write_text("hello\n")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert_failed(
        result,
        f"no key opens layer {descriptor['digest']}",
        "wrapped for: JWE (2 recipients: RSA-OAEP, ECDH-ES+A256KW P-384)",
        f"{keys}/ec256-sec1.pem (EC P-256)",
        f"{keys}/other-rsa2048.pem (RSA 2048)",
        f"{keys}/notes.txt (not a private key",
        f"{keys}/rsa2048.pub.pem (public key",
    )
    assert result.stdout == b""


def test_no_keys_at_all(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    missing = tmp_path / "nonexistent"
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(missing))
    assert_failed(
        result, "no usable private key was found", f"{missing} (key directory cannot be read"
    )
    assert result.stdout == b""


def test_no_payload_on_fd3(tmp_path: Path) -> None:
    ciphertext, _, _ = skopeo_fixture("rsa2048")
    result = run_decoder(ciphertext, None, args_for(key_dir(tmp_path, "rsa2048-pkcs1.pem")))
    assert_failed(
        result, "no decryption payload on fd 3", 'key_model = "node"', "use_local_image_pull = true"
    )
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "payload on fd 3 is empty"),
        (os.urandom(64) + b"\xff" * 12, "not a protobuf Any"),
        (any_bytes(b"{}", "io.containerd.other"), "type URL 'io.containerd.other'"),
        (any_bytes(b"\x00garbage"), "JSON"),
    ],
)
def test_garbage_payload(payload: bytes, message: str, tmp_path: Path) -> None:
    ciphertext, _, _ = skopeo_fixture("rsa2048")
    result = run_decoder(ciphertext, payload, args_for(key_dir(tmp_path, "rsa2048-pkcs1.pem")))
    assert_failed(result, message)
    assert result.stdout == b""


def tar_gz_layer(size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), mtime=0)


def layer_and_keys(tmp_path: Path, plaintext: bytes, **kw: object) -> tuple[object, list[str]]:
    layer = encrypt_layer(plaintext, [KEYS / "ec256.pub.pem"], **kw)  # type: ignore[arg-type]
    return layer, args_for(key_dir(tmp_path, "ec256-sec1.pem"))


def damaged_run(tmp_path: Path, plaintext: bytes, damage: str) -> object:
    """Decrypt the layer after truncating it, flipping a bit or appending bytes (with the
    descriptor's size following the truncation and the extension)."""
    layer, args = layer_and_keys(tmp_path, plaintext)
    data = bytearray(layer.ciphertext)  # type: ignore[attr-defined]
    descriptor = dict(layer.descriptor)  # type: ignore[attr-defined]
    if damage == "truncate":
        del data[-5000:]
        descriptor["size"] = len(data)
    elif damage == "flip":
        data[100_000] ^= 4
    else:
        data += b"more"
        descriptor["size"] = len(data)
    return run_decoder(bytes(data), payload_bytes(descriptor), args)


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend"])
def test_tampered_small_layer_writes_nothing(damage: str, tmp_path: Path) -> None:
    """Up to FULL_HOLD the whole layer waits for both checks: not one byte gets out."""
    plaintext = tar_gz_layer(400_000)
    result = damaged_run(tmp_path, plaintext, damage)
    assert_failed(result, "HMAC check", "; nothing was written", plaintext=plaintext)
    assert result.stdout == b""  # type: ignore[attr-defined]


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend"])
def test_tampered_layer_is_not_a_complete_stream(damage: str, tmp_path: Path) -> None:
    """Above FULL_HOLD a prefix goes out, cut inside a tar block and before the gzip trailer."""
    plaintext = tar_gz_layer(layercipher.FULL_HOLD + 400_000)
    result = damaged_run(tmp_path, plaintext, damage)
    assert_failed(result, "HMAC check", "the end of the plaintext was withheld",
                  plaintext=plaintext)
    stdout = result.stdout  # type: ignore[attr-defined]
    assert len(stdout) % 512 == 1
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(stdout)


def test_size_mismatch_with_descriptor(tmp_path: Path) -> None:
    plaintext = tar_gz_layer(100_000)
    layer, args = layer_and_keys(tmp_path, plaintext)
    result = run_decoder(layer.ciphertext[:-10], payload_bytes(layer.descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, "stdin ended after", "descriptor gives", plaintext=plaintext)
    assert result.stdout == b"", "a layer up to FULL_HOLD is held whole"


def test_digest_mismatch_uncompressed_tar(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i in range(layercipher.FULL_HOLD // 4096 + 40):
            info = tarfile.TarInfo(f"f{i}")
            info.size = 4096
            tar.addfile(info, io.BytesIO(os.urandom(4096)))
    plaintext = raw.getvalue()
    layer, args = layer_and_keys(
        tmp_path, plaintext, media_type=TAR_ENCRYPTED, private={"digest": "sha256:" + "0" * 64}
    )
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, "does not match the sha256 digest", plaintext=plaintext)
    assert sha256(plaintext)[7:] not in result.stderr, "the confidential digest is not shown"
    assert len(result.stdout) % 512 == 1, "a tar reader sees a cut block, not a clean end"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"private": {"cipheroptions": {}}}, "carry no nonce"),
        ({"private": {"cipheroptions": {"nonce": b64(b"short")}}}, "nonce is 5 bytes"),
        ({"private": {"symkey": b64(b"k" * 31)}}, "key is 31 bytes"),
        ({"public": {"cipher": "AES_256_GCM"}}, "uses cipher 'AES_256_GCM'"),
        ({"public": {"hmac": None}}, "carry no HMAC"),
        ({"private": {"digest": None}}, "no plaintext digest"),
        (
            {"media_type": "application/vnd.oci.image.layer.v1.tar+gzip"},
            "is not an encrypted layer type",
        ),
        (
            {"media_type": "application/vnd.wasm.content.layer.v1+wasm+encrypted"},
            "not an encrypted layer type",
        ),
    ],
)
def test_bad_layer_options(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    plaintext = tar_gz_layer(1000)
    layer, args = layer_and_keys(tmp_path, plaintext, **kwargs)
    result = run_decoder(layer.ciphertext, payload_bytes(layer.descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, message)
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({JWE_ANNOTATION: None}, "has no wrapped keys"),
        ({PUBOPTS: None}, "no org.opencontainers.image.enc.pubopts annotation"),
        ({PUBOPTS: "%%%"}, "pubopts annotation is not valid base64"),
        ({JWE_ANNOTATION: "not base64!"}, "is not valid base64"),
        ({JWE_ANNOTATION: b64(b"{}")}, "JWE 1 is malformed"),
        (
            {JWE_ANNOTATION: None, "org.opencontainers.image.enc.keys.pkcs7": b64(b"x")},
            "PKCS7 (1 recipient: an unreadable PKCS7)",
        ),
        (
            {JWE_ANNOTATION: None, "org.opencontainers.image.enc.keys.provider.kms": b64(b"x")},
            "key provider 'kms' (key providers are not supported",
        ),
    ],
)
def test_bad_annotations(annotations: dict[str, str | None], message: str, tmp_path: Path) -> None:
    layer, args = layer_and_keys(tmp_path, tar_gz_layer(1000))
    descriptor = json.loads(json.dumps(layer.descriptor))  # type: ignore[attr-defined]
    for name, value in annotations.items():
        if value is None:
            descriptor["annotations"].pop(name)
        else:
            descriptor["annotations"][name] = value
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, message)
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--decryption-keys-path"], "needs a value"),
        (["positional"], "unexpected argument 'positional'"),
        (["--decryption-keys-path="], "empty path"),
    ],
)
def test_bad_arguments(args: list[str], message: str) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args)
    assert_failed(result, message)
    assert result.stdout == b""


def test_help_and_version() -> None:
    result = run_decoder(b"", None, ["--version"])
    assert (result.returncode, result.stdout.decode()) == (0, f"ctd-decoder {__version__}\n")
    result = run_decoder(b"", None, ["--help"])
    assert result.returncode == 0 and b"--decryption-keys-path" in result.stdout


def test_key_material_never_printed(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    key_bytes = (KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes()
    keys = key_dir(tmp_path, "rsa2048-pkcs8-encrypted.pem")
    (keys / "rsa2048-pkcs8-encrypted.pem.password").write_text("wrong-password-XYZ")
    params = {
        "privkeys": [b64((KEYS / "other-rsa2048.pem").read_bytes())],
        "privkeys-passwords": [b64(b"payload-pw-ABC")],
    }
    result = run_decoder(ciphertext, payload_bytes(descriptor, params), args_for(keys))
    assert_failed(result, "password is wrong")
    for secret in (
        "wrong-password-XYZ",
        "payload-pw-ABC",
        key_bytes.decode().splitlines()[1][:20],
        base64.b64encode(key_bytes).decode()[:20],
    ):
        assert secret not in result.stderr


def test_hostile_file_names_stay_on_one_line(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    keys = key_dir(tmp_path, "other-rsa2048.pem")
    (keys / "evil\nname\x1b[31m").write_text("not a key")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert_failed(result, "evil\\nname\\x1b[31m (not a private key")
    assert "\x1b" not in result.stderr


def test_message_length_is_capped(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    keys = tmp_path / "many"
    keys.mkdir()
    for i in range(400):
        (keys / f"stray-file-number-{i:04d}.txt").write_text("x")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args_for(keys))
    assert_failed(result, "(truncated)")
    assert len(result.stderr) < 8300


def test_failure_keeps_stdout_open_past_exit(tmp_path: Path) -> None:
    # containerd checks the processor's exit only after stdout ends: the error must come first.
    import select
    import subprocess
    import sys
    import time

    ciphertext, descriptor, _ = skopeo_fixture("rsa2048")
    payload = tmp_path / "payload"
    payload.write_bytes(payload_bytes(descriptor))
    blob = tmp_path / "blob"
    blob.write_bytes(ciphertext)
    proc = subprocess.Popen(
        [
            "/bin/bash",
            "-c",
            f'exec 3<"{payload}" <"{blob}"; exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "decoder",
            "--decryption-keys-path",
            str(tmp_path / "none"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.wait(timeout=60) == 1
    assert proc.stderr is not None and proc.stdout is not None
    assert b"no key opens layer" in proc.stderr.read()
    exited = time.monotonic()
    readable, _, _ = select.select([proc.stdout], [], [], 5)
    assert readable and proc.stdout.read() == b""
    assert time.monotonic() - exited > 0.1, "stdout must stay open a moment past the exit"


def test_negative_descriptor_size(tmp_path: Path) -> None:
    layer, args = layer_and_keys(tmp_path, tar_gz_layer(1000))
    descriptor = {**layer.descriptor, "size": -1}  # type: ignore[attr-defined]
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, "size is negative")


def test_appended_ciphertext_keeps_the_layer_incomplete(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = 300_000
        tar.addfile(info, io.BytesIO(os.urandom(300_000)))
    plaintext = raw.getvalue()
    layer, args = layer_and_keys(tmp_path, plaintext, media_type=TAR_ENCRYPTED)
    data = layer.ciphertext + os.urandom(70 * 1024)  # type: ignore[attr-defined]
    result = run_decoder(data, payload_bytes(layer.descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, "stdin carries more than", plaintext=plaintext)
    assert len(result.stdout) <= len(plaintext) - 64 * 1024
    with pytest.raises(tarfile.ReadError), tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        tar.getmembers()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("target", ["pubopts", "jwe"])
def test_deeply_nested_json_is_an_error_not_a_crash(target: str, tmp_path: Path) -> None:
    layer, args = layer_and_keys(tmp_path, tar_gz_layer(1000))
    descriptor = json.loads(json.dumps(layer.descriptor))  # type: ignore[attr-defined]
    name = PUBOPTS if target == "pubopts" else JWE_ANNOTATION
    descriptor["annotations"][name] = b64(b'{"a":' + nested(100_000) + b"}")
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args)  # type: ignore[attr-defined]
    assert_failed(result, "nested too deeply" if target == "pubopts" else "JWE 1 is malformed")


def jwe_with_header(header: dict[str, object]) -> str:
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    blob = {
        "protected": enc(json.dumps(header).encode()),
        "encrypted_key": "AAAA",
        "iv": "AAAA",
        "ciphertext": "AAAA",
        "tag": "AAAA",
    }
    return b64(json.dumps(blob).encode())


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RSA-OAEP", "enc": ["A256GCM"]},
        {"alg": {"x": 1}, "enc": "A256GCM"},
        {
            "alg": "ECDH-ES+A256KW",
            "enc": "A256GCM",
            "apu": 5,
            "epk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
        },
    ],
)
def test_hostile_jwe_headers_are_errors_not_crashes(
    header: dict[str, object], tmp_path: Path
) -> None:
    layer, _ = layer_and_keys(tmp_path, tar_gz_layer(1000))
    keys = key_dir(tmp_path, "ec256-sec1.pem", "rsa2048-pkcs1.pem")
    descriptor = json.loads(json.dumps(layer.descriptor))  # type: ignore[attr-defined]
    descriptor["annotations"][JWE_ANNOTATION] = jwe_with_header(header)
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args_for(keys))  # type: ignore[attr-defined]
    assert_failed(result, "no key opens layer")


def test_ecdh_recipient_with_bad_apu_and_a_real_point(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def coordinate(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes(32, "big")).decode().rstrip("=")

    header = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "apu": "not base64url!",
        "epk": {
            "kty": "EC",
            "crv": "P-256",
            "x": coordinate(numbers.x),
            "y": coordinate(numbers.y),
        },
    }
    test_hostile_jwe_headers_are_errors_not_crashes(header, tmp_path)


def test_newlines_inside_the_jwe_annotation_are_accepted(tmp_path: Path) -> None:
    plaintext = tar_gz_layer(1000)
    layer, args = layer_and_keys(tmp_path, plaintext)
    descriptor = json.loads(json.dumps(layer.descriptor))  # type: ignore[attr-defined]
    value = descriptor["annotations"][JWE_ANNOTATION]
    descriptor["annotations"][JWE_ANNOTATION] = "\n".join(
        value[i : i + 76] for i in range(0, len(value), 76)
    )
    result = run_decoder(layer.ciphertext, payload_bytes(descriptor), args)  # type: ignore[attr-defined]
    assert result.returncode == 0 and result.stdout == plaintext


def test_help_and_version_to_a_closed_or_broken_stdout() -> None:
    import subprocess
    import sys

    for shell in ('"$@" --help >&-', '"$@" --version | true'):
        proc = subprocess.run(
            ["/bin/bash", "-c", shell, "sh", sys.executable, "-m", "decoder"],
            capture_output=True,
            check=False,
        )
        assert b"Traceback" not in proc.stderr


def test_payload_writer_that_never_finishes(tmp_path: Path) -> None:
    import subprocess
    import sys

    from decoder import payload

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    code = (
        "import decoder.payload as p, decoder.cli as c, sys; p.PAYLOAD_TIMEOUT_SECONDS = 1;"
        "sys.exit(c.run(['--decryption-keys-path', '/nonexistent']))"
    )
    proc = subprocess.run(
        ["/bin/bash", "-c", f'exec 3<>"{fifo}"; exec "$@"', "sh", sys.executable, "-c", code],
        capture_output=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"ctd-decoder: the payload on fd 3 did not end within 1 s")
    assert proc.stderr.count(b"\n") == 1 and b"Traceback" not in proc.stderr
    assert payload.PAYLOAD_TIMEOUT_SECONDS == 30.0


# --- key providers: the configuration is accepted, provider-wrapped layers are refused ------


def keyprovider_setup(tmp_path: Path, how: str) -> tuple[list[str], dict[str, str], Path]:
    """Extra args and env naming a key-provider config (ocicrypt's format) whose provider
    command would leave a marker file if anything ran it."""
    marker = tmp_path / "provider-ran"
    command = tmp_path / "provider.sh"
    command.write_text(f"#!/bin/sh\ntouch '{marker}'\necho '{{}}'\n")
    command.chmod(0o755)
    config = tmp_path / "ocicrypt_keyprovider.conf"
    config.write_text(json.dumps({
        "key-providers": {
            "kms": {"cmd": {"path": str(command), "args": []}},
            "grpc-kms": {"grpc": "localhost:1"},
        }
    }))
    missing = tmp_path / "no-such-keyprovider.conf"  # as containerd's default config names one
    forms: dict[str, tuple[list[str], dict[str, str]]] = {
        "flag": (["--keyprovider-config", str(config)], {}),
        "flag=": ([f"--keyprovider-config={config}"], {}),
        "env": ([], {"OCICRYPT_KEYPROVIDER_CONFIG": str(config)}),
        "env, file missing": ([], {"OCICRYPT_KEYPROVIDER_CONFIG": str(missing)}),
        "flag and env": (
            ["-keyprovider-config", str(config)], {"OCICRYPT_KEYPROVIDER_CONFIG": str(missing)}
        ),
    }
    args, env = forms[how]
    return args, env, marker


KEYPROVIDER_FORMS = ["flag", "flag=", "env", "env, file missing", "flag and env"]


@pytest.mark.parametrize("how", KEYPROVIDER_FORMS)
def test_keyprovider_config_is_accepted(how: str, tmp_path: Path) -> None:
    plaintext = tar_gz_layer(100_000)
    layer, args = layer_and_keys(tmp_path, plaintext)
    extra, env, marker = keyprovider_setup(tmp_path, how)
    result = run_decoder(
        layer.ciphertext, payload_bytes(layer.descriptor), [*args, *extra], env=env  # type: ignore[attr-defined]
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == plaintext
    assert not marker.exists()


@pytest.mark.parametrize("how", KEYPROVIDER_FORMS)
def test_layer_wrapped_only_for_a_key_provider_is_refused(how: str, tmp_path: Path) -> None:
    layer, args = layer_and_keys(tmp_path, tar_gz_layer(100_000))
    descriptor = json.loads(json.dumps(layer.descriptor))  # type: ignore[attr-defined]
    del descriptor["annotations"][JWE_ANNOTATION]
    wrapped = b64(json.dumps({"keyprovider": "kms", "wrapped": b64(os.urandom(64))}).encode())
    descriptor["annotations"]["org.opencontainers.image.enc.keys.provider.kms"] = wrapped
    extra, env, marker = keyprovider_setup(tmp_path, how)
    result = run_decoder(
        layer.ciphertext, payload_bytes(descriptor), [*args, *extra], env=env  # type: ignore[attr-defined]
    )
    assert_failed(
        result,
        f"no key opens layer {descriptor['digest']}",
        "the layer is wrapped for: key provider 'kms' "
        "(key providers are not supported by this version)",
    )
    assert result.stdout == b""
    assert not marker.exists(), "the provider's command must not run"


# --- the no-key error is the same text on every run ------------------------------------------


def test_no_key_error_is_identical_across_hash_seeds(tmp_path: Path) -> None:
    """Nothing in the message may depend on set or dict iteration order, which
    PYTHONHASHSEED changes: operators diff these lines and grep logs for them."""
    from tests.support import wrap_jwe

    layer = encrypt_layer(tar_gz_layer(1000), [KEYS / "rsa2048.pub.pem", KEYS / "ec384.pub.pem"])
    descriptor = json.loads(json.dumps(layer.descriptor))
    annotations = descriptor["annotations"]
    second = wrap_jwe(b'{"symkey":""}', [KEYS / "ec256.pub.pem", KEYS / "rsa4096.pub.pem"])
    annotations[JWE_ANNOTATION] += f",{b64(second)},{b64(b'{}')}"
    alice = json.loads((Path(__file__).parent / "assets" / "pkcs7" / "alice.json").read_text())
    annotations["org.opencontainers.image.enc.keys.pkcs7"] = alice["annotations"][
        "org.opencontainers.image.enc.keys.pkcs7"
    ]
    annotations["org.opencontainers.image.enc.keys.pgp"] = b64(b"pgp packet")
    annotations["org.opencontainers.image.enc.keys.provider.zeta"] = b64(b"{}")
    annotations["org.opencontainers.image.enc.keys.provider.alpha"] = b64(b"{}")
    annotations["org.opencontainers.image.enc.keys.zzz-unknown"] = b64(b"?")

    keys = key_dir(
        tmp_path, "other-rsa2048.pem", "ec521-sec1.pem", "ec256-pkcs8-costly-scrypt.pem",
        "rsa2048.pub.pem", "rsa2048-pkcs8-encrypted.pem", "ed25519.pem",
    )
    (keys / "README").write_text("node keys\n")
    (keys / "empty").write_bytes(b"")
    (keys / "sub" / "deeper").mkdir(parents=True)
    (keys / "sub" / "b.pem").write_bytes((KEYS / "ec384-sec1.pem").read_bytes().replace(
        b"BEGIN EC PRIVATE KEY", b"BEGIN EC PRIVATE KEX"))
    (keys / "sub" / "a.der").write_bytes((KEYS / "ec521-sec1.der").read_bytes())
    (keys / "sub" / "deeper" / "notes.txt").write_text("x")
    (keys / "sub" / "loop").symlink_to("..")
    second_dir = tmp_path / "more-keys"
    second_dir.mkdir()
    (second_dir / "bob.pem").write_bytes(
        (Path(__file__).parent / "assets" / "pkcs7" / "bob-key.pem").read_bytes()
    )
    params = {"privkeys": [b64((KEYS / "ec384-pkcs8.pem").read_bytes().replace(b"A", b"B")),
                           b64((KEYS / "ec521-pkcs8.pem").read_bytes())]}
    args = [*args_for(keys), *args_for(second_dir), *args_for(tmp_path / "absent")]
    payload = payload_bytes(descriptor, params)

    results = [
        run_decoder(layer.ciphertext, payload, args, env={"PYTHONHASHSEED": seed})
        for seed in ("0", "1", "12345", "4294967295")
    ]
    for result in results:
        assert_failed(
            result,
            f"no key opens layer {descriptor['digest']}",
            "keys tried: ",
            "skipped: ",
            "the layer is wrapped for: JWE (5 recipients: ",
            "key provider 'alpha'",
            "key provider 'zeta'",
            "JWE 3 is malformed",
        )
        assert result.stdout == b""
    assert len({r.stderr for r in results}) == 1, [r.stderr for r in results]

"""PKCS7 (CMS EnvelopedData) unwrap and wrap, checked against what other implementations write
and read: layers skopeo (Go ocicrypt) encrypted, envelopes `openssl cms` writes, skopeo and
openssl decrypting what `wrap` writes, and hand-built DER for the variants nobody ships."""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from decoder.errors import KeyLoadError
from decoder.keys import KeyRing, load_keyring
from decoder.keywrap import NOT_YET_SUPPORTED, SCHEMES, pkcs7
from tests.support import GZIP_ENCRYPTED, KEYS, PUBOPTS, b64, payload_bytes, run_decoder

P7 = Path(__file__).parent / "assets" / "pkcs7"
ANNOTATION = "org.opencontainers.image.enc.keys.pkcs7"
SECRET = b'{"symkey":"c2VjcmV0","digest":"sha256:00","cipheroptions":{}}'
# alice's certificate is self-signed with a random serial; bob's CA gave him 0x1a2b
ALICE_SERIAL = x509.load_pem_x509_certificate((P7 / "alice-cert.pem").read_bytes()).serial_number
ALICE = f"issuer CN=pyimgcrypt-pkcs7-alice serial {ALICE_SERIAL:#x}"
BOB = "issuer CN=pyimgcrypt test CA,O=pyimgcrypt serial 0x1a2b"
POLICY = '{"default":[{"type":"insecureAcceptAnything"}]}'


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fixture(name: str) -> tuple[bytes, dict[str, Any], str]:
    """A skopeo-encrypted layer: (ciphertext, descriptor, plaintext digest)."""
    descriptor = json.loads((P7 / f"{name}.json").read_text())
    digest = descriptor.pop("x-plaintext-digest")
    return (P7 / f"{name}.blob").read_bytes(), descriptor, digest


def annotation_blob(name: str) -> bytes:
    return base64.b64decode(fixture(name)[1]["annotations"][ANNOTATION])


def certificate(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((P7 / f"{name}-cert.pem").read_bytes())


def ring_of(keys: list[str], certificates: list[str]) -> KeyRing:
    return load_keyring(
        [],
        {
            "privkeys": [(P7 / f"{k}-key.pem").read_bytes() for k in keys],
            "x509s": [(P7 / f"{c}-cert.pem").read_bytes() for c in certificates],
        },
    )


def key_dir(tmp_path: Path, *names: str) -> list[str]:
    directory = tmp_path / "keys"
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes((P7 / name).read_bytes())
    return ["--decryption-keys-path", str(directory)]


def run(*command: str, data: bytes | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(command, input=data, capture_output=True, cwd=cwd, check=False)


def der(tag: int, content: bytes) -> bytes:
    """A DER TLV, written here independently of the module under test."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = b""
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.insert(0, 0x80 | arc & 0x7F)
        body += bytes(chunk)
    return der(0x06, body)


# --- the decoder end to end on layers skopeo encrypted ------------------------------------


@pytest.mark.parametrize(
    ("name", "who"),
    [("alice", "alice"), ("two-recipients", "alice"), ("two-recipients", "bob")],
)
def test_skopeo_layer_with_certificate_beside_key(name: str, who: str, tmp_path: Path) -> None:
    ciphertext, descriptor, digest = fixture(name)
    args = key_dir(tmp_path, f"{who}-key.pem", f"{who}-cert.pem")
    result = run_decoder(ciphertext, payload_bytes(descriptor), args)
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def test_skopeo_layer_with_jwe_and_pkcs7_opens_with_the_pkcs7_key(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = fixture("jwe-and-pkcs7")
    assert {"org.opencontainers.image.enc.keys.jwe", ANNOTATION} <= set(descriptor["annotations"])
    result = run_decoder(
        ciphertext, payload_bytes(descriptor), key_dir(tmp_path, "bob-key.pem", "bob-cert.pem")
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def test_key_and_certificate_in_one_pem_file(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = fixture("alice")
    directory = tmp_path / "keys"
    directory.mkdir()
    both = (P7 / "alice-key.pem").read_bytes() + (P7 / "alice-cert.pem").read_bytes()
    (directory / "alice.pem").write_bytes(both)
    result = run_decoder(
        ciphertext, payload_bytes(descriptor), ["--decryption-keys-path", str(directory)]
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def test_certificate_passed_as_payload_x509s(tmp_path: Path) -> None:
    ciphertext, descriptor, digest = fixture("two-recipients")
    params = {"x509s": [b64((P7 / "bob-cert.pem").read_bytes())]}
    args = key_dir(tmp_path, "bob-key.pem")
    result = run_decoder(ciphertext, payload_bytes(descriptor, params), args)
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest
    params["privkeys"] = [b64((P7 / "bob-key.pem").read_bytes())]
    result = run_decoder(ciphertext, payload_bytes(descriptor, params), [])
    assert (result.returncode, result.stderr) == (0, "")
    assert sha256(result.stdout) == digest


def test_without_the_certificate_it_fails_saying_where_to_put_it(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = fixture("alice")
    result = run_decoder(ciphertext, payload_bytes(descriptor), key_dir(tmp_path, "alice-key.pem"))
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.count("\n") == 1
    for fragment in (
        "opens PKCS7 1 recipient",
        "no certificate for it was found",
        "beside the key in the key directory",
        "x509s",
        f"the layer is wrapped for: PKCS7 (1 recipient: {ALICE})",
    ):
        assert fragment in result.stderr


def test_someone_elses_layer_names_its_recipient(tmp_path: Path) -> None:
    ciphertext, descriptor, _ = fixture("alice")
    result = run_decoder(
        ciphertext, payload_bytes(descriptor), key_dir(tmp_path, "bob-key.pem", "bob-cert.pem")
    )
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith("ctd-decoder: no key opens layer ")
    assert result.stderr.count("\n") == 1
    assert f"the layer is wrapped for: PKCS7 (1 recipient: {ALICE})" in result.stderr


# --- unwrap -----------------------------------------------------------------------------


def test_registered_as_a_scheme() -> None:
    assert SCHEMES["pkcs7"] == "decoder.keywrap.pkcs7"
    assert "pkcs7" not in NOT_YET_SUPPORTED


def test_skopeo_envelope_structure() -> None:
    # What Go ocicrypt writes, byte for byte where it is not random.
    blob = annotation_blob("alice")
    gcm = re.search(rb"\x06\x09\x60\x86\x48\x01\x65\x03\x04\x01\x06(.{21})\xa0", blob, re.S)
    assert gcm is not None, "AES-128-GCM algorithm identifier"
    parameters = gcm.group(1)
    assert parameters[:6] == bytes.fromhex("1013 3011 840c")  # primitive [UNIVERSAL 16]
    assert parameters[18:] == bytes.fromhex("020110")  # ICV length 16
    assert bytes.fromhex("300b 0609 2a864886f70d010101 0482 0100") in blob  # no NULL
    envelope = pkcs7.parse(blob)
    [recipient] = envelope.recipients
    assert recipient.issuer == _raw_issuer(certificate("alice"))
    assert recipient.serial == certificate("alice").serial_number


def _raw_issuer(cert: x509.Certificate) -> bytes:
    name = cert.issuer.public_bytes()
    assert name in cert.tbs_certificate_bytes
    return name


def test_two_recipients_each_key_alone() -> None:
    blob = annotation_blob("two-recipients")
    plaintexts = [pkcs7.unwrap([blob], ring_of([w], [w]), []) for w in ("alice", "bob")]
    assert plaintexts[0] is not None and plaintexts[0] == plaintexts[1]
    assert json.loads(plaintexts[0])["digest"] == fixture("two-recipients")[2]


def test_second_blob_opens_when_first_does_not() -> None:
    first = pkcs7.wrap(b"first", [certificate("alice")])
    second = annotation_blob("two-recipients")
    notes: list[str] = []
    assert pkcs7.unwrap([first, second], ring_of(["bob"], ["bob"]), notes) is not None
    assert notes == []


def test_certificate_without_its_key_is_noted() -> None:
    ring = load_keyring(
        [],
        {
            "privkeys": [(KEYS / "other-rsa2048.pem").read_bytes()],
            "x509s": [(P7 / "alice-cert.pem").read_bytes()],
        },
    )
    notes: list[str] = []
    assert pkcs7.unwrap([annotation_blob("alice")], ring, notes) is None
    assert any(
        f"payload certificate 1 names PKCS7 1 recipient ({ALICE}) but no private key" in n
        for n in notes
    )
    assert any("no x509 certificate was found for payload key 1" in n for n in notes)


def test_ec_keys_cannot_open_pkcs7() -> None:
    ring = load_keyring([], {"privkeys": [(KEYS / "ec256-sec1.pem").read_bytes()]})
    notes: list[str] = []
    assert pkcs7.unwrap([annotation_blob("alice")], ring, notes) is None
    assert notes == [
        "PKCS7 needs an RSA private key with its x509 certificate; no RSA key was found"
    ]


def test_describe_names_issuer_and_serial() -> None:
    described = pkcs7.describe([annotation_blob("two-recipients")])
    assert described == f"PKCS7 (2 recipients: {BOB}, {ALICE})"
    assert pkcs7.describe([b"x", annotation_blob("alice")]) == (
        f"PKCS7 (2 recipients: an unreadable PKCS7, {ALICE})"
    )


def test_many_recipients_are_capped() -> None:
    blob = pkcs7.wrap(SECRET, [certificate("alice")] * 300)
    notes: list[str] = []
    assert pkcs7.unwrap([blob], ring_of(["bob"], ["bob"]), notes) is None
    assert "PKCS7 1 has 300 recipients; only the first 256 were tried" in notes
    assert pkcs7.describe([blob]).endswith(f"{ALICE} and 292 more)")
    assert pkcs7.describe([blob]).count("issuer") == 8


def _replace_encrypted_key(blob: bytes, new_key: bytes) -> bytes:
    [recipient] = pkcs7.parse(blob).recipients
    assert len(new_key) == len(recipient.encrypted_key) and blob.count(recipient.encrypted_key) == 1
    return blob.replace(recipient.encrypted_key, new_key)


def test_wrapped_key_failures_all_read_the_same() -> None:
    # PKCS#1 v1.5: a padding error must look exactly like a wrong content key (Bleichenbacher).
    blob = annotation_blob("alice")
    public = certificate("alice").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    flipped_content = bytearray(blob)
    flipped_content[-1] ^= 1
    variants = {
        "random bytes": _replace_encrypted_key(blob, os.urandom(256)),
        "valid padding, 5-byte key": _replace_encrypted_key(
            blob, public.encrypt(b"12345", padding.PKCS1v15())
        ),
        "valid padding, wrong key": _replace_encrypted_key(
            blob, public.encrypt(os.urandom(16), padding.PKCS1v15())
        ),
        "tampered content": bytes(flipped_content),
    }
    seen = set()
    for blob_variant in variants.values():
        notes: list[str] = []
        assert pkcs7.unwrap([blob_variant], ring_of(["alice"], ["alice"]), notes) is None
        assert len(notes) == 1
        seen.add(notes[0])
    assert seen == {
        "payload key 1 with certificate payload certificate 1 does not open its PKCS7 1 "
        f"recipient ({ALICE}): tampered wrapped key or content"
    }


# --- hostile input ----------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    inner = b"\x05\x00"
    for _ in range(depth):
        inner = der(0x30, inner)
    return inner


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "truncated element"),
        (b"\x30", "truncated length"),
        (b"\x30\x84\xff\xff\xff\xff", "element longer than the data"),
        (b"\x30\x89" + b"\xff" * 9, "length too large"),
        (b"\x30\x80" * 5000, "nested more than 32 deep"),
        (_nested(2000), "nested more than 32 deep"),
        (b"\x04\x80\x00\x00", "indefinite length on a primitive"),
        (b"\x30\x80\x05\x00", "without an end"),
        (b"\x1f\xff\xff\xff\xff\x7f\x00", "tag number too large"),
        (der(0x30, b"\x05\x00" * 70000), "more than 65536 elements"),
        (der(0x30, oid("1.2.840.113549.1.7.1")) + b"\x00", "trailing data"),
        (der(0x30, oid("1.2.840.113549.1.7.2") + der(0xA0, der(0x30, b""))), "signedData"),
        (der(0x30, oid("1.2.840.113549.1.7.3") + der(0xA0, der(0x30, b""))), "version"),
        (der(0x02, b"\x00"), "not a ContentInfo"),
    ],
)
def test_malformed_blobs_are_noted(blob: bytes, reason: str) -> None:
    notes: list[str] = []
    assert pkcs7.unwrap([blob], ring_of(["alice"], ["alice"]), notes) is None
    assert notes[0].startswith("PKCS7 1 is malformed: ") and reason in notes[0]
    assert pkcs7.describe([blob]) == "PKCS7 (1 recipient: an unreadable PKCS7)"


def test_truncations_and_flips_never_crash() -> None:
    blob = annotation_blob("alice")
    ring = ring_of(["alice"], ["alice"])
    good = pkcs7.unwrap([blob], ring, [])
    assert good is not None
    for size in range(len(blob)):
        assert pkcs7.unwrap([blob[:size]], ring, []) is None
        pkcs7.describe([blob[:size]])
    for position in range(len(blob)):
        for mask in (0x01, 0x80):
            damaged = bytearray(blob)
            damaged[position] ^= mask
            assert pkcs7.unwrap([bytes(damaged)], ring, []) in (None, good)
            pkcs7.describe([bytes(damaged)])


# --- wrap -------------------------------------------------------------------------------


@pytest.mark.parametrize("content", sorted(pkcs7.CONTENT_ENCRYPTIONS))
def test_wrap_round_trip(content: str) -> None:
    blob = pkcs7.wrap(
        SECRET, [certificate("alice"), certificate("bob")], content_encryption=content
    )
    for who in ("alice", "bob"):
        assert pkcs7.unwrap([blob], ring_of([who], [who]), []) == SECRET
    assert pkcs7.unwrap([blob], ring_of(["alice"], ["bob"]), []) is None


def test_wrap_is_laid_out_as_skopeo_writes_it() -> None:
    # Same certificate and plaintext length: every tag, length and non-random value agree.
    skopeo_blob = annotation_blob("alice")
    plaintext = pkcs7.unwrap([skopeo_blob], ring_of(["alice"], ["alice"]), [])
    assert plaintext is not None
    ours = pkcs7.wrap(plaintext, [certificate("alice")])

    def layout(blob: bytes) -> list[str]:
        result = run("openssl", "asn1parse", "-inform", "DER", data=blob)
        assert result.returncode == 0, result.stderr
        return [
            re.sub(r"\[HEX DUMP\]:\w+", "", line) for line in result.stdout.decode().split("\n")
        ]

    assert layout(ours) == layout(skopeo_blob)
    assert len(ours) == len(skopeo_blob)


def test_wrap_sorts_recipients_as_go_does() -> None:
    # Go's encoding/asn1 sorts a SET OF by encoding: bob's (shorter) RecipientInfo first.
    blob = pkcs7.wrap(SECRET, [certificate("alice"), certificate("bob")])
    assert [r.serial for r in pkcs7.parse(blob).recipients] == [
        r.serial for r in pkcs7.parse(annotation_blob("two-recipients")).recipients
    ]


def _self_signed(key: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-rsa")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2120, 1, 1))
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "an EC"),
        (ed25519.Ed25519PrivateKey.generate(), "an EdDSA"),
    ],
)
def test_wrap_refuses_non_rsa_certificates(key: Any, kind: str) -> None:
    with pytest.raises(KeyLoadError, match=f"CN=not-rsa has {kind} key; PKCS7 wraps keys for RSA"):
        pkcs7.wrap(SECRET, [certificate("alice"), _self_signed(key)])
    with pytest.raises(ValueError, match="at least one recipient"):
        pkcs7.wrap(SECRET, [])


# --- variants only other writers produce ------------------------------------------------


def _rfc5084_envelope(oaep_parameters: bytes, encrypted_key: bytes, key: bytes, tag: int) -> bytes:
    nonce = os.urandom(12)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
    ciphertext = encryptor.update(SECRET) + encryptor.finalize() + encryptor.tag[:tag]
    alice = certificate("alice")
    recipient = der(
        0x30,
        der(0x02, b"\x00")
        + der(0x30, _raw_issuer(alice) + der(0x02, alice.serial_number.to_bytes(20, "big")))
        + der(0x30, oid("1.2.840.113549.1.1.7") + oaep_parameters)
        + der(0x04, encrypted_key),
    )
    gcm = der(0x30, der(0x04, nonce) + (der(0x02, bytes([tag])) if tag != 12 else b""))
    content = der(
        0x30,
        oid("1.2.840.113549.1.7.1")
        + der(0x30, oid("2.16.840.1.101.3.4.1.46") + gcm)
        + der(0x80, ciphertext),  # primitive [0] this time
    )
    enveloped = der(0x30, der(0x02, b"\x00") + der(0x31, recipient) + content)
    return der(0x30, oid("1.2.840.113549.1.7.3") + der(0xA0, enveloped))


@pytest.mark.parametrize(
    ("parameters", "hash_name", "mgf_hash"),
    [
        (b"", "SHA1", "SHA1"),  # absent: all defaults
        (der(0x30, b""), "SHA1", "SHA1"),
        # Go's pkcs7 writes only the hash and masks with it too
        (der(0x30, der(0xA0, der(0x30, oid("2.16.840.1.101.3.4.2.1")))), "SHA256", "SHA256"),
        # RFC 4055 reading of the same: MGF1 stays SHA-1
        (der(0x30, der(0xA0, der(0x30, oid("2.16.840.1.101.3.4.2.1")))), "SHA256", "SHA1"),
        (
            der(
                0x30,
                der(0xA0, der(0x30, oid("2.16.840.1.101.3.4.2.3")))
                + der(
                    0xA1,
                    der(0x30, oid("1.2.840.113549.1.1.8") + der(0x30, oid("1.3.14.3.2.26"))),
                ),
            ),
            "SHA512",
            "SHA1",
        ),
    ],
)
@pytest.mark.parametrize("tag", [16, 12])
def test_oaep_and_rfc5084_gcm(parameters: bytes, hash_name: str, mgf_hash: str, tag: int) -> None:
    key = os.urandom(32)
    public = certificate("alice").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    digest, mgf = getattr(hashes, hash_name)(), getattr(hashes, mgf_hash)()
    encrypted_key = public.encrypt(key, padding.OAEP(padding.MGF1(mgf), digest, None))
    blob = _rfc5084_envelope(parameters, encrypted_key, key, tag)
    notes: list[str] = []
    assert pkcs7.unwrap([blob], ring_of(["alice"], ["alice"]), notes) == SECRET, notes


# --- openssl ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "options"),
    [
        ("bob", ["-aes-256-cbc"]),
        ("bob", ["-aes-192-cbc", "-keyopt", "rsa_padding_mode:oaep"]),
        (
            "bob",
            ["-aes-128-cbc", "-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"],
        ),
        ("bob", ["-aes-128-cbc", "-stream"]),  # BER with indefinite lengths
        # DES-EDE3-CBC to a subjectKeyIdentifier recipient (only alice's certificate has one)
        ("alice", ["-des3", "-keyid"]),
    ],
)
def test_openssl_envelopes_open(who: str, options: list[str], tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    command = ["openssl", "cms", "-encrypt", "-binary", "-in", str(tmp_path / "secret")]
    command += ["-outform", "DER", options[0], "-recip", str(P7 / f"{who}-cert.pem"), *options[1:]]
    result = run(*command)
    assert result.returncode == 0, result.stderr
    notes: list[str] = []
    assert pkcs7.unwrap([result.stdout], ring_of([who], [who]), notes) == SECRET, notes
    if "-keyid" in options:
        assert pkcs7.describe([result.stdout]).startswith("PKCS7 (1 recipient: subject key id ")


def test_openssl_auth_enveloped_data_is_named(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    result = run(
        "openssl", "cms", "-encrypt", "-binary", "-in", str(tmp_path / "secret"), "-outform",
        "DER", "-aes-128-gcm", "-recip", str(P7 / "bob-cert.pem"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes: list[str] = []
    assert pkcs7.unwrap([result.stdout], ring_of(["bob"], ["bob"]), notes) is None
    assert notes == ["PKCS7 1 is malformed: content type authEnvelopedData is not envelopedData"]


def _openssl_decrypt(blob: bytes, who: str) -> Any:
    return run(
        "openssl", "cms", "-decrypt", "-inform", "DER", "-binary",
        "-recip", str(P7 / f"{who}-cert.pem"), "-inkey", str(P7 / f"{who}-key.pem"),
        data=blob,
    )  # fmt: skip


@pytest.mark.parametrize("content", ["aes-128-cbc", "aes-192-cbc", "aes-256-cbc"])
def test_openssl_opens_our_cbc_envelopes(content: str) -> None:
    blob = pkcs7.wrap(
        SECRET, [certificate("alice"), certificate("bob")], content_encryption=content
    )
    for who in ("alice", "bob"):
        result = _openssl_decrypt(blob, who)
        assert (result.returncode, result.stdout) == (0, SECRET), result.stderr


def test_openssl_cannot_read_the_go_gcm_parameters() -> None:
    # Neither Go ocicrypt's envelopes nor ours (the same encoding) parse in OpenSSL.
    for blob in (annotation_blob("alice"), pkcs7.wrap(SECRET, [certificate("alice")])):
        result = _openssl_decrypt(blob, "alice")
        assert result.returncode != 0
        assert b"type not constructed" in result.stderr
        assert b"Field=parameter" in result.stderr


# --- skopeo decrypting what wrap writes ---------------------------------------------------


@dataclass
class Image:
    layout: Path
    plaintext_digest: str


def _tar_gz() -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = os.urandom(5000)
        info = tarfile.TarInfo("data.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)


def _encrypted_layer(
    plaintext: bytes, wrapped_for: list[x509.Certificate]
) -> tuple[bytes, dict[str, Any]]:
    """ocicrypt's AES-256-CTR + HMAC-SHA256 layer cipher, keys wrapped with pkcs7.wrap."""
    key, nonce = os.urandom(32), os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    private = {
        "symkey": b64(key),
        "digest": sha256(plaintext),
        "cipheroptions": {"nonce": b64(nonce)},
    }
    public = {
        "cipher": "AES_256_CTR_HMAC_SHA256",
        "hmac": b64(hmac.new(key, ciphertext, "sha256").digest()),
        "cipheroptions": {},
    }
    descriptor = {
        "mediaType": GZIP_ENCRYPTED,
        "digest": sha256(ciphertext),
        "size": len(ciphertext),
        "annotations": {
            ANNOTATION: b64(pkcs7.wrap(json.dumps(private).encode(), wrapped_for)),
            PUBOPTS: b64(json.dumps(public).encode()),
        },
    }
    return ciphertext, descriptor


def _write_layout(root: Path, layer: bytes, descriptor: dict[str, Any], diff_id: str) -> None:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, Any]:
        (blobs / sha256(data)[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    (blobs / descriptor["digest"][7:]).write_bytes(layer)
    config = {"architecture": "amd64", "os": "linux", "config": {}}
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_id]}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": put(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor],
    }
    entry = put(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    entry["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _layer_of(layout: Path) -> tuple[dict[str, Any], bytes]:
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    [layer] = manifest["layers"]
    return layer, (layout / "blobs" / "sha256" / layer["digest"][7:]).read_bytes()


@pytest.fixture(scope="module")
def wrapped_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    work = tmp_path_factory.mktemp("pkcs7-image")
    tar, plaintext = _tar_gz()
    layer, descriptor = _encrypted_layer(plaintext, [certificate("alice"), certificate("bob")])
    _write_layout(work / "enc", layer, descriptor, sha256(tar))
    plain: dict[str, Any] = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    plain |= {"digest": sha256(plaintext), "size": len(plaintext)}
    _write_layout(work / "plain", plaintext, plain, sha256(tar))
    (work / "policy.json").write_text(POLICY)
    return Image(work, sha256(plaintext))


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_skopeo_decrypts_our_wrap(who: str, wrapped_image: Image) -> None:
    work = wrapped_image.layout
    result = run(
        "skopeo", "--policy", "policy.json", "copy", "-q",
        "--decryption-key", str(P7 / f"{who}-key.pem"),
        "--decryption-key", str(P7 / f"{who}-cert.pem"),
        "oci:enc:v1", f"oci:dec-{who}:v1",
        cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    layer, blob = _layer_of(work / f"dec-{who}")
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert ANNOTATION not in layer.get("annotations", {})
    assert sha256(blob) == layer["digest"] == wrapped_image.plaintext_digest


def test_skopeo_like_upstream_needs_the_certificate(wrapped_image: Image) -> None:
    result = run(
        "skopeo", "--policy", "policy.json", "copy", "-q",
        "--decryption-key", str(P7 / "alice-key.pem"), "oci:enc:v1", "oci:dec-nocert:v1",
        cwd=wrapped_image.layout,
    )  # fmt: skip
    assert result.returncode != 0
    assert b"none of the private keys could be used for decryption" in result.stderr


def test_decoder_opens_what_skopeo_encrypts_now(wrapped_image: Image, tmp_path: Path) -> None:
    # A fresh skopeo run, besides the committed fixtures made by one.
    work = wrapped_image.layout
    result = run(
        "skopeo", "--policy", "policy.json", "copy", "-q",
        "--encryption-key", f"pkcs7:{P7 / 'bob-cert.pem'}", "oci:plain:v1", "oci:reenc:v1",
        cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    descriptor, ciphertext = _layer_of(work / "reenc")
    assert pkcs7.describe([base64.b64decode(descriptor["annotations"][ANNOTATION])]) == (
        f"PKCS7 (1 recipient: {BOB})"
    )
    decoded = run_decoder(
        ciphertext, payload_bytes(descriptor), key_dir(tmp_path, "bob-key.pem", "bob-cert.pem")
    )
    assert (decoded.returncode, decoded.stderr) == (0, "")
    assert sha256(decoded.stdout) == wrapped_image.plaintext_digest


def test_private_keys_load_as_committed() -> None:
    for who in ("alice", "bob"):
        key = serialization.load_pem_private_key((P7 / f"{who}-key.pem").read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        public = certificate(who).public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert key.public_key().public_numbers() == public.public_numbers()

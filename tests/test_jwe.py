"""JWE unwrapping, cross-checked against JWEs that jwcrypto (an independent implementation)
writes in every algorithm, content encryption and serialization ocicrypt may meet."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from decoder.keys import KeyRing, load_keyring
from decoder.keywrap import jwe
from tests.support import KEYS, wrap_jwe

SECRET = b'{"symkey":"c2VjcmV0","digest":"sha256:00","cipheroptions":{}}'


def ring_of(*names: str) -> KeyRing:
    params: dict[str, list[bytes | None]] = {"privkeys": [(KEYS / n).read_bytes() for n in names]}
    return load_keyring([], params)


@pytest.mark.parametrize(
    ("public", "private", "alg"),
    [
        ("rsa2048.pub.pem", "rsa2048-pkcs1.pem", "RSA-OAEP"),
        ("rsa2048.pub.pem", "rsa2048-pkcs8.der", "RSA-OAEP-256"),
        ("rsa4096.pub.pem", "rsa4096-pkcs8.pem", "RSA-OAEP"),
        ("ec256.pub.pem", "ec256-sec1.pem", "ECDH-ES+A128KW"),
        ("ec256.pub.pem", "ec256-pkcs8.pem", "ECDH-ES+A192KW"),
        ("ec256.pub.pem", "ec256.jwk.json", "ECDH-ES+A256KW"),
        ("ec384.pub.pem", "ec384-sec1.der", "ECDH-ES+A256KW"),
        ("ec521.pub.pem", "ec521-pkcs8.pem", "ECDH-ES+A256KW"),
    ],
)
@pytest.mark.parametrize(
    "enc", ["A128GCM", "A192GCM", "A256GCM", "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512"]
)
def test_algorithms_against_jwcrypto(public: str, private: str, alg: str, enc: str) -> None:
    blob = wrap_jwe(SECRET, [KEYS / public], algs=[alg], enc=enc)
    notes: list[str] = []
    assert jwe.unwrap([blob], ring_of(private), notes) == SECRET


@pytest.mark.parametrize("compact", [True, False])
def test_compact_and_flattened(compact: bool) -> None:
    blob = wrap_jwe(SECRET, [KEYS / "ec384.pub.pem"], compact=compact)
    assert blob.startswith(b"{") is not compact
    assert jwe.unwrap([blob], ring_of("ec384-pkcs8.pem"), []) == SECRET


def test_general_serialization_several_recipients_each_key_alone() -> None:
    blob = wrap_jwe(SECRET, [KEYS / "rsa2048.pub.pem", KEYS / "ec521.pub.pem"])
    assert len(json.loads(blob)["recipients"]) == 2
    assert jwe.unwrap([blob], ring_of("rsa2048-pkcs8.pem"), []) == SECRET
    assert jwe.unwrap([blob], ring_of("ec521-sec1.pem"), []) == SECRET
    assert jwe.unwrap([blob], ring_of("other-rsa2048.pem", "ec256-sec1.pem"), []) is None


def test_go_jose_top_level_encrypted_key_is_tolerated() -> None:
    # go-jose v4 also writes recipient 0's encrypted_key at the top level of general JSON.
    blob = json.loads(wrap_jwe(SECRET, [KEYS / "rsa2048.pub.pem", KEYS / "ec256.pub.pem"]))
    blob["encrypted_key"] = blob["recipients"][0]["encrypted_key"]
    assert jwe.unwrap([json.dumps(blob).encode()], ring_of("ec256-sec1.pem"), []) == SECRET


def test_second_blob_opens_when_first_does_not() -> None:
    first = wrap_jwe(b"first", [KEYS / "rsa4096.pub.pem"])
    second = wrap_jwe(SECRET, [KEYS / "ec256.pub.pem"])
    assert jwe.unwrap([first, second], ring_of("ec256-sec1.pem"), []) == SECRET


def test_wrong_curve_key_is_not_tried() -> None:
    blob = wrap_jwe(SECRET, [KEYS / "ec384.pub.pem"])
    assert jwe.unwrap([blob], ring_of("ec256-sec1.pem", "ec521-sec1.pem"), []) is None


def test_tampered_content_is_refused_with_a_note() -> None:
    blob = json.loads(wrap_jwe(SECRET, [KEYS / "rsa2048.pub.pem"]))
    ct = bytearray(base64.urlsafe_b64decode(blob["ciphertext"] + "=="))
    ct[0] ^= 1
    blob["ciphertext"] = base64.urlsafe_b64encode(bytes(ct)).decode().rstrip("=")
    notes: list[str] = []
    assert jwe.unwrap([json.dumps(blob).encode()], ring_of("rsa2048-pkcs1.pem"), notes) is None
    assert any("content does not decrypt" in n for n in notes)


@pytest.mark.parametrize(
    ("blob", "note"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"a.b.c", "five-part"),
        (b"{not json", "not valid JSON"),
        (b'{"recipients": []}', "non-empty array"),
        (b'{"protected": "e30", "encrypted_key": "", "iv": 5, "ciphertext": "", "tag": ""}', "iv"),
    ],
)
def test_malformed_blobs_are_noted(blob: bytes, note: str) -> None:
    notes: list[str] = []
    assert jwe.unwrap([blob], ring_of("rsa2048-pkcs1.pem"), notes) is None
    assert note in notes[0]


def test_disallowed_algorithms_are_refused() -> None:
    for header in (
        {"alg": "RSA1_5", "enc": "A256GCM"},
        {"alg": "dir", "enc": "A256GCM"},
        {"alg": "RSA-OAEP", "enc": "XC20P"},
    ):
        protected = base64.urlsafe_b64encode(json.dumps(header).encode()).decode().rstrip("=")
        blob = f"{protected}.AA.AA.AA.AA".encode()
        notes: list[str] = []
        assert jwe.unwrap([blob], ring_of("rsa2048-pkcs1.pem"), notes) is None
        assert notes and "not" in notes[0]


def test_describe_names_recipients() -> None:
    blob = wrap_jwe(SECRET, [KEYS / "rsa2048.pub.pem", KEYS / "ec384.pub.pem"])
    assert jwe.describe([blob]) == "JWE (2 recipients: RSA-OAEP, ECDH-ES+A256KW P-384)"


def test_skopeo_blob_parses(tmp_path: Path) -> None:
    from tests.support import skopeo_fixture

    _, descriptor, _ = skopeo_fixture("two-recipients")
    raw = base64.b64decode(descriptor["annotations"]["org.opencontainers.image.enc.keys.jwe"])
    assert jwe.describe([raw]) == "JWE (2 recipients: RSA-OAEP, ECDH-ES+A256KW P-384)"


# --- wrapping ---------------------------------------------------------------------------------


def public_key(name: str) -> object:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key((KEYS / name).read_bytes())


@pytest.mark.parametrize(
    ("publics", "algs"),
    [
        (["rsa2048.pub.pem"], [None]),
        (["ec256.pub.pem"], [None]),
        (["ec521.pub.pem"], ["ECDH-ES+A128KW"]),
        (["rsa4096.pub.pem"], ["RSA-OAEP-256"]),
        (["rsa2048.pub.pem", "ec384.pub.pem"], [None, None]),
    ],
)
def test_wrap_is_read_by_jwcrypto_and_by_us(publics: list[str], algs: list[str | None]) -> None:
    from jwcrypto import jwe as jwcrypto_jwe
    from jwcrypto import jwk

    recipients = [(public_key(p), a) for p, a in zip(publics, algs, strict=True)]
    blob = jwe.wrap(SECRET, recipients)
    shape = json.loads(blob)
    assert ("recipients" in shape) is (len(publics) > 1)
    privates = {
        "rsa2048.pub.pem": "rsa2048-pkcs8.pem",
        "rsa4096.pub.pem": "rsa4096-pkcs8.pem",
        "ec256.pub.pem": "ec256-pkcs8.pem",
        "ec384.pub.pem": "ec384-pkcs8.pem",
        "ec521.pub.pem": "ec521-pkcs8.pem",
    }
    for public in publics:
        private = privates[public]
        assert jwe.unwrap([blob], ring_of(private), []) == SECRET
        token = jwcrypto_jwe.JWE()
        token.allowed_algs = [*jwe.KEY_ALGORITHMS, "A256GCM"]
        token.deserialize(blob.decode(), key=jwk.JWK.from_pem((KEYS / private).read_bytes()))
        assert token.payload == SECRET


def test_kid_is_the_rfc7638_thumbprint() -> None:
    from jwcrypto import jwk

    for name in ("rsa2048.pub.pem", "ec384.pub.pem"):
        key = public_key(name)
        expected = jwk.JWK.from_pem((KEYS / name).read_bytes()).thumbprint()
        assert jwe.thumbprint(key) == expected
        header = json.loads(
            base64.urlsafe_b64decode(
                json.loads(jwe.wrap(SECRET, [(key, None)]))["protected"] + "=="
            )
        )
        assert header["kid"] == expected
        assert "kid " + expected in jwe.describe([jwe.wrap(SECRET, [(key, None)])])

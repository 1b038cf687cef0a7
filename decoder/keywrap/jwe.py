"""JWE key wrapping (RFC 7516), as ocicrypt writes and reads it through go-jose.

Reads compact, flattened-JSON and general-JSON serializations with any number of
recipients. Key algorithms: RSA-OAEP, RSA-OAEP-256, ECDH-ES+A128KW/A192KW/A256KW; content
encryption: A128/A192/A256GCM and A128CBC-HS256/A192CBC-HS384/A256CBC-HS512 (what go-jose
accepts for ocicrypt). Built on cryptography's primitives; jwcrypto is not imported here
because it costs a whole layer's decryption time to import.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, NamedTuple

from decoder.keys import KeyRing, PrivateKey

if TYPE_CHECKING:
    from collections.abc import Callable

KEY_ALGORITHMS = ("RSA-OAEP", "RSA-OAEP-256", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW")
_KW_KEY_BYTES = {"ECDH-ES+A128KW": 16, "ECDH-ES+A192KW": 24, "ECDH-ES+A256KW": 32}
_GCM_KEY_BYTES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}
# enc -> (CEK bytes, hash for the HMAC half)
_CBC_HS = {
    "A128CBC-HS256": (32, "sha256"),
    "A192CBC-HS384": (48, "sha384"),
    "A256CBC-HS512": (64, "sha512"),
}
_CURVES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
_MAX_INFLATED = 1 << 20
MAX_RECIPIENTS = 256
_DESCRIBED_RECIPIENTS = 8


class JWEFormatError(ValueError):
    """The blob is not a JWE this module can read."""


class Recipient(NamedTuple):
    header: dict[str, Any]
    encrypted_key: bytes


class JWE(NamedTuple):
    protected_b64: str
    recipients: list[Recipient]
    iv: bytes
    ciphertext: bytes
    tag: bytes
    aad_b64: str | None


def _b64url(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise JWEFormatError(f"{what} is not a base64url string")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError) as e:
        raise JWEFormatError(f"{what} is not valid base64url") from e


def _header(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JWEFormatError(f"{what} is not a JSON object")
    return value


def parse(blob: bytes) -> JWE:
    """Parse a JWE in compact or JSON (flattened or general) serialization."""
    try:
        text = blob.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise JWEFormatError("not UTF-8 text") from e
    if not text.startswith("{"):
        parts = text.split(".")
        if len(parts) != 5:
            raise JWEFormatError("neither JSON nor a five-part compact serialization")
        protected = _protected(parts[0])
        return JWE(
            parts[0],
            [Recipient(protected, _b64url(parts[1], "encrypted_key"))],
            _b64url(parts[2], "iv"),
            _b64url(parts[3], "ciphertext"),
            _b64url(parts[4], "tag"),
            None,
        )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise JWEFormatError("not valid JSON") from e
    if not isinstance(obj, dict):
        raise JWEFormatError("JSON that is not an object")
    protected_b64 = obj.get("protected", "")
    if not isinstance(protected_b64, str):
        raise JWEFormatError("protected is not a string")
    shared = {
        **_header(obj.get("unprotected"), "unprotected"),
        **(_protected(protected_b64) if protected_b64 else {}),
    }
    raw_recipients = obj.get("recipients")
    if raw_recipients is None:
        raw_recipients = [
            {"header": obj.get("header"), "encrypted_key": obj.get("encrypted_key", "")}
        ]
    if not isinstance(raw_recipients, list) or not raw_recipients:
        raise JWEFormatError("recipients is not a non-empty array")
    recipients = []
    for r in raw_recipients:
        if not isinstance(r, dict):
            raise JWEFormatError("a recipient is not an object")
        header = {**_header(r.get("header"), "recipient header"), **shared}
        recipients.append(Recipient(header, _b64url(r.get("encrypted_key", ""), "encrypted_key")))
    aad = obj.get("aad")
    if aad is not None and not isinstance(aad, str):
        raise JWEFormatError("aad is not a string")
    return JWE(
        protected_b64,
        recipients,
        _b64url(obj.get("iv"), "iv"),
        _b64url(obj.get("ciphertext"), "ciphertext"),
        _b64url(obj.get("tag"), "tag"),
        aad,
    )


def _protected(b64: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(b64, "protected header"))
    except (ValueError, RecursionError) as e:
        raise JWEFormatError("protected header is not JSON") from e
    return _header(value, "protected header")


def describe(blobs: list[bytes]) -> str:
    """Say which recipients the JWE blobs name (algorithm, curve, kid where present)."""
    names = []
    for blob in blobs:
        try:
            jwe = parse(blob)
        except JWEFormatError:
            names.append("an unreadable JWE")
            continue
        for r in jwe.recipients:
            alg = str(r.header.get("alg", "?"))
            epk = r.header.get("epk")
            if isinstance(epk, dict) and "crv" in epk:
                alg += f" {epk['crv']}"
            if "kid" in r.header:
                alg += f" kid {r.header['kid']}"
            names.append(alg)
    count = len(names)
    shown = ", ".join(names[:_DESCRIBED_RECIPIENTS])
    if count > _DESCRIBED_RECIPIENTS:
        shown += f" and {count - _DESCRIBED_RECIPIENTS} more"
    return f"JWE ({count} recipient{'s' if count != 1 else ''}: {shown})"


def unwrap(blobs: list[bytes], ring: KeyRing, notes: list[str]) -> bytes | None:
    """The JWE plaintext (ocicrypt's private options) from the first blob any key opens."""
    budget = MAX_RECIPIENTS  # over all blobs of the layer: each recipient costs a try per key
    for index, blob in enumerate(blobs, start=1):
        if budget <= 0:
            notes.append(f"the layer's JWEs have more than {MAX_RECIPIENTS} recipients in all; "
                         f"JWE {index} and later were not tried")
            break
        try:
            jwe = parse(blob)
        except JWEFormatError as e:
            notes.append(f"JWE {index} is malformed: {e}")
            continue
        if len(jwe.recipients) > budget:
            notes.append(
                f"JWE {index} has {len(jwe.recipients)} recipients; only the first "
                f"{budget} were tried ({MAX_RECIPIENTS} per layer)"
            )
        tried, budget = jwe.recipients[:budget], budget - len(jwe.recipients[:budget])
        for recipient in tried:
            alg = recipient.header.get("alg")
            enc = recipient.header.get("enc")
            if not isinstance(alg, str) or not isinstance(enc, str):
                notes.append(f"JWE {index}: a recipient's alg or enc is not a string")
                continue
            if alg not in KEY_ALGORITHMS:
                notes.append(f"JWE {index}: key algorithm {alg!r} is not one ocicrypt uses")
                continue
            if enc not in _GCM_KEY_BYTES and enc not in _CBC_HS:
                notes.append(f"JWE {index}: content encryption {enc!r} is not supported")
                continue
            if recipient.header.get("crit"):
                notes.append(f"JWE {index}: critical header parameters are not understood")
                continue
            for key in ring.private_keys:
                cek = _unwrap_cek(alg, recipient, key)
                if cek is None:
                    continue
                plaintext = _decrypt_content(jwe, recipient.header, enc, cek)
                if plaintext is None:
                    notes.append(
                        f"{key.source} opens a JWE {index} recipient but the content does not "
                        "decrypt (tampered wrapped key)"
                    )
                    continue
                return plaintext
    return None


def _unwrap_cek(alg: str, recipient: Recipient, key: PrivateKey) -> bytes | None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = key.key
    if alg.startswith("RSA-OAEP"):
        if not isinstance(private, rsa.RSAPrivateKey):
            return None
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        digest: hashes.HashAlgorithm = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()  # noqa: S303
        try:
            return private.decrypt(
                recipient.encrypted_key,
                padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None),
            )
        except ValueError:
            return None
    from cryptography.hazmat.primitives.asymmetric import ec  # not imported for RSA keys

    if not isinstance(private, ec.EllipticCurvePrivateKey):
        return None
    epk = recipient.header.get("epk")
    if not isinstance(epk, dict) or epk.get("kty") != "EC":
        return None
    if _CURVES.get(str(epk.get("crv"))) != private.curve.name:
        return None
    try:
        public = ec.EllipticCurvePublicNumbers(
            int.from_bytes(_b64url(epk.get("x"), "epk x"), "big"),
            int.from_bytes(_b64url(epk.get("y"), "epk y"), "big"),
            private.curve,
        ).public_key()
        shared = private.exchange(ec.ECDH(), public)
    except (ValueError, JWEFormatError):
        return None
    size = _KW_KEY_BYTES[alg]
    try:
        apu = _b64url(recipient.header.get("apu", ""), "apu")
        apv = _b64url(recipient.header.get("apv", ""), "apv")
    except JWEFormatError:
        return None
    kek = _concat_kdf(shared, alg.encode(), apu, apv, size)
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    try:
        return aes_key_unwrap(kek, recipient.encrypted_key)
    except (InvalidUnwrap, ValueError):
        return None


def _concat_kdf(shared: bytes, algorithm_id: bytes, apu: bytes, apv: bytes, size: int) -> bytes:
    """NIST SP 800-56A Concat KDF with SHA-256, as RFC 7518 section 4.6.2 specifies for JWE."""

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    # cryptography's SHA-256, already loaded: hashlib would load a second libcrypto
    from cryptography.hazmat.primitives import hashes

    other_info = field(algorithm_id) + field(apu) + field(apv) + (size * 8).to_bytes(4, "big")
    sha256 = hashes.Hash(hashes.SHA256())
    sha256.update(b"\x00\x00\x00\x01" + shared + other_info)
    return sha256.finalize()[:size]


def _decrypt_content(jwe: JWE, header: dict[str, Any], enc: str, cek: bytes) -> bytes | None:
    try:
        aad = jwe.protected_b64.encode("ascii")
        if jwe.aad_b64 is not None:
            aad += b"." + jwe.aad_b64.encode("ascii")
    except UnicodeEncodeError:
        return None
    if enc in _GCM_KEY_BYTES:
        if len(cek) != _GCM_KEY_BYTES[enc]:
            return None
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            plaintext = AESGCM(cek).decrypt(jwe.iv, jwe.ciphertext + jwe.tag, aad)
        except (InvalidTag, ValueError):
            return None
    else:
        size, hash_name = _CBC_HS[enc]
        if len(cek) != size or len(jwe.iv) != 16:
            return None
        import hmac  # AES-CBC-HMAC content only (ocicrypt writes AES-GCM)

        mac_key, enc_key = cek[: size // 2], cek[size // 2 :]
        al = (len(aad) * 8).to_bytes(8, "big")
        mac = hmac.new(mac_key, aad + jwe.iv + jwe.ciphertext + al, hash_name).digest()
        if not hmac.compare_digest(mac[: size // 2], jwe.tag):
            return None
        from cryptography.hazmat.primitives import padding as sym_padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(jwe.iv)).decryptor()
        try:
            padded = decryptor.update(jwe.ciphertext) + decryptor.finalize()
            unpadder = sym_padding.PKCS7(128).unpadder()
            plaintext = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            return None
    if header.get("zip") == "DEF":
        import zlib  # only JWEs with "zip": "DEF" need it

        try:
            inflater = zlib.decompressobj(-15)
            plaintext = inflater.decompress(plaintext, _MAX_INFLATED)
        except zlib.error:
            return None
    elif "zip" in header:
        return None
    return plaintext


# --- wrapping (the encoder) ----------------------------------------------------------------


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


_CURVE_NAMES = {v: k for k, v in _CURVES.items()}


def public_jwk(public_key: Any) -> dict[str, str]:
    """The public JWK members of an RSA or EC (P-256/384/521) public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {
            "e": _b64url_encode(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "kty": "RSA",
            "n": _b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        }
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        crv = _CURVE_NAMES.get(public_key.curve.name)
        if crv is None:
            raise ValueError(f"EC curve {public_key.curve.name} cannot be a JWE recipient")
        size = (public_key.curve.key_size + 7) // 8
        ec_numbers = public_key.public_numbers()
        return {
            "crv": crv,
            "kty": "EC",
            "x": _b64url_encode(ec_numbers.x.to_bytes(size, "big")),
            "y": _b64url_encode(ec_numbers.y.to_bytes(size, "big")),
        }
    raise ValueError(f"{type(public_key).__name__} cannot be a JWE recipient (RSA or EC only)")


def thumbprint(public_key: Any) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a public key: our recipients' kid."""
    canonical = json.dumps(public_jwk(public_key), separators=(",", ":"), sort_keys=True)
    import hashlib

    return _b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def default_algorithm(public_key: Any) -> str:
    """What ocicrypt uses: RSA-OAEP for RSA keys, ECDH-ES+A256KW for EC keys."""
    return "RSA-OAEP" if public_jwk(public_key)["kty"] == "RSA" else "ECDH-ES+A256KW"


def _wrap_cek(cek: bytes, public_key: Any, alg: str) -> tuple[dict[str, Any], bytes]:
    """(per-recipient header members, encrypted_key) for one recipient."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    if alg.startswith("RSA-OAEP"):
        digest: hashes.HashAlgorithm = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()  # noqa: S303
        encrypted = public_key.encrypt(
            cek, padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
        )
        return {"alg": alg}, encrypted
    if alg not in _KW_KEY_BYTES or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError(f"key algorithm {alg} does not fit a {public_jwk(public_key)['kty']} key")
    ephemeral = ec.generate_private_key(public_key.curve)
    shared = ephemeral.exchange(ec.ECDH(), public_key)
    kek = _concat_kdf(shared, alg.encode(), b"", b"", _KW_KEY_BYTES[alg])
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    return {"alg": alg, "epk": public_jwk(ephemeral.public_key())}, aes_key_wrap(kek, cek)


def recipients_binding(recipients: list[Recipient], exclude: str = "") -> bytes:
    """The recipients of a JWE (each one's merged header without `exclude`, and its
    encrypted key) as canonical JSON, for a MAC that binds them."""
    entries = [
        {"header": {k: v for k, v in r.header.items() if k != exclude},
         "encrypted_key": _b64url_encode(r.encrypted_key)}
        for r in recipients
    ]
    return json.dumps(entries, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def wrap(
    plaintext: bytes, recipients: list[tuple[Any, str | None]],
    extra_protected: Callable[[bytes], dict[str, str]] | None = None,
) -> bytes:
    """Encrypt `plaintext` (private options JSON) as one JWE for all recipients, the way
    go-jose serializes it for ocicrypt: flattened JSON with every header protected for one
    recipient, general JSON with per-recipient headers for several; content A256GCM. Each
    recipient is (public key, key algorithm or None for ocicrypt's default) and gets its
    RFC 7638 thumbprint as `kid`, which go-jose ignores when decrypting. `extra_protected`,
    given the recipients_binding of the recipients as they will parse, returns parameters
    for the protected header (go-jose ignores parameters it does not know)."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not recipients:
        raise ValueError("a JWE needs at least one recipient")
    cek = AESGCM.generate_key(bit_length=256)
    iv = os.urandom(12)
    wrapped = []
    for public_key, alg in recipients:
        header, encrypted_key = _wrap_cek(cek, public_key, alg or default_algorithm(public_key))
        header["kid"] = thumbprint(public_key)
        wrapped.append((header, encrypted_key))
    if len(wrapped) == 1:
        protected = {**wrapped[0][0], "enc": "A256GCM"}
    else:
        protected = {"enc": "A256GCM"}
    if extra_protected is not None:
        as_parsed = [Recipient({**header, **protected}, key) for header, key in wrapped]
        protected.update(extra_protected(recipients_binding(as_parsed)))
    protected_b64 = _b64url_encode(json.dumps(protected, separators=(",", ":")).encode())
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected_b64.encode("ascii"))
    body: dict[str, Any] = {"protected": protected_b64}
    if len(wrapped) == 1:
        body["encrypted_key"] = _b64url_encode(wrapped[0][1])
    else:
        body["recipients"] = [
            {"header": header, "encrypted_key": _b64url_encode(key)} for header, key in wrapped
        ]
    body["iv"] = _b64url_encode(iv)
    body["ciphertext"] = _b64url_encode(sealed[:-16])
    body["tag"] = _b64url_encode(sealed[-16:])
    return json.dumps(body, separators=(",", ":")).encode()

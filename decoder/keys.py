"""Where the decoder's private keys come from, and what each file turned out to be.

Key directories (`--decryption-keys-path`) are walked recursively in name order. Symbolic
links are followed, so a Kubernetes Secret or ConfigMap volume (files that link through
`..data`) works; a link that leaves the directory or loops back is skipped with a warning,
and each real file is read once. A file that is not a usable private key never stops
decryption: it is recorded with the reason and named if no key opens the layer.

A key file NAME may have its password in NAME.password beside it (one trailing newline is
dropped). Payload keys (`privkeys` with `privkeys-passwords`, `x509s`) follow directory keys.
For the encoder, the same classification reads `--key` files, and recipients' public keys
and certificates are loaded here too.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import stat
from typing import TYPE_CHECKING, Any, NamedTuple

from decoder.errors import KeyLoadError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.x509 import Certificate

    PrivateKeyType = RSAPrivateKey | EllipticCurvePrivateKey

PASSWORD_SUFFIX = ".password"  # noqa: S105 (a file-name suffix)
NO_PASSWORD = "encrypted private key and no password for it"  # noqa: S105 (a reason)
WRONG_PASSWORD = "encrypted private key and its password is wrong"  # noqa: S105 (a reason)
MAX_KEY_FILE_BYTES = 1024 * 1024
MAX_DIRECTORY_ENTRIES = 4096
MAX_DIRECTORY_DEPTH = 16
MAX_RSA_BITS = 16384
MAX_PBKDF2_ITERATIONS = 2_000_000
MAX_SCRYPT_BYTES = 256 * 1024 * 1024

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")
_PRIVATE_PEM_TYPES = {
    b"PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
}
_PUBLIC_PEM_TYPES = {b"PUBLIC KEY", b"RSA PUBLIC KEY"}
_IGNORED_PEM_TYPES = {b"EC PARAMETERS"}
_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class PrivateKey(NamedTuple):
    """A usable private key and where it came from."""

    source: str
    key: PrivateKeyType
    description: str


class CertificateEntry(NamedTuple):
    """An x509 certificate (used by PKCS7 unwrapping) and where it came from."""

    source: str
    certificate: Certificate


class KeyRing:
    """Everything the key sources yielded, in the order keys are tried."""

    def __init__(
        self,
        private_keys: list[PrivateKey] | None = None,
        certificates: list[CertificateEntry] | None = None,
        directories: list[str] | None = None,
    ) -> None:
        self.private_keys: list[PrivateKey] = private_keys or []
        self.certificates: list[CertificateEntry] = certificates or []
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.directories: list[str] = directories or []
        self.payload_keys = 0

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append((source, reason))

    def skip_with_warning(self, source: str, reason: str) -> None:
        """A skip worth a warning even when another key opens the layer."""
        self.skip(source, reason)
        self.warnings.append(f"skipped {source}: {reason}")


def load_keyring(directories: list[str], parameters: dict[str, list[bytes | None]]) -> KeyRing:
    """Collect keys from the key directories first, then from the payload parameters."""
    ring = KeyRing(directories=list(directories))
    for directory in directories:
        _load_directory(directory, ring)
    passwords = parameters.get("privkeys-passwords", [])
    ring.payload_keys = len(parameters.get("privkeys", []))
    for index, data in enumerate(parameters.get("privkeys", []), start=1):
        source = f"payload key {index}"
        password = passwords[index - 1] if index - 1 < len(passwords) else None
        if data is None:
            ring.skip(source, "empty")
            continue
        skipped_before = len(ring.skipped)
        _classify(data, password, source, ring)
        if len(ring.skipped) > skipped_before and ring.skipped[-1][1] == NO_PASSWORD:
            ring.skipped[-1] = (source, f"{NO_PASSWORD} (privkeys-passwords has none for it)")
    for index, data in enumerate(parameters.get("x509s", []), start=1):
        if data is not None:
            _classify(data, None, f"payload certificate {index}", ring)
    return ring


# --- key directories --------------------------------------------------------------------


class _Found(NamedTuple):
    display: str
    real: str


def _load_directory(directory: str, ring: KeyRing) -> None:
    if not directory:
        raise KeyLoadError("--decryption-keys-path was given an empty path")
    try:
        root_real = os.path.realpath(directory, strict=True)
        if not stat.S_ISDIR(os.stat(root_real).st_mode):
            ring.skip(directory, "key path is not a directory")
            return
    except OSError as e:
        ring.skip(directory, f"key directory cannot be read ({e.strerror})")
        return
    found, entries = _walk(directory, root_real, ring)
    names: dict[str, list[str]] = {}  # real path -> every entry (link or file) that reaches it
    for entry, real in entries.items():
        names.setdefault(real, []).append(entry)

    def beside(item: _Found) -> list[_Found]:
        """The password files beside the key's names (a link's own name included)."""
        files: list[_Found] = []
        for name in names.get(item.real, [item.real]):
            real = entries.get(name + PASSWORD_SUFFIX)
            if real is not None and real in found and found[real] not in files:
                files.append(found[real])
        return files

    skipped_names = {source for source, _ in ring.skipped}
    for item in found.values():
        if all(name.endswith(PASSWORD_SUFFIX) and name[: -len(PASSWORD_SUFFIX)] in entries
               for name in names.get(item.real, [item.real])):
            continue  # the password of the key file beside it (by every name it has)
        data = _read_file(item, ring)
        if data is None:
            continue
        passwords: list[tuple[bytes | None, str]] = []
        for password_item in beside(item):
            raw = _read_file(password_item, ring)
            if raw is not None:
                passwords.append((strip_newline(raw), password_item.display))
        skipped_before = len(ring.skipped)
        classify_trying(data, passwords, item.display, ring)  # a link and its key may each have one
        if len(ring.skipped) == skipped_before:
            continue
        reason = ring.skipped[-1][1]
        if item.real.endswith(PASSWORD_SUFFIX):
            key_name = item.display[: -len(PASSWORD_SUFFIX)]
            reason = (f"password file of {key_name}, which was skipped" if key_name in
                      skipped_names else "password file with no key file beside it")
        elif reason == NO_PASSWORD:
            name = os.path.basename(item.display) + PASSWORD_SUFFIX
            reason = f"{NO_PASSWORD} (put it in {name} beside it)"
        elif reason == WRONG_PASSWORD:
            reason = f"{WRONG_PASSWORD} (from {' and '.join(shown for _, shown in passwords)})"
        ring.skipped[-1] = (item.display, reason)


class _Frame:
    __slots__ = ("ancestors", "display", "index", "names")

    def __init__(self, display: str, ancestors: tuple[str, ...], names: list[str]) -> None:
        self.display = display
        self.ancestors = ancestors
        self.names = names
        self.index = 0


def _walk(
    root_display: str, root_real: str, ring: KeyRing
) -> tuple[dict[str, _Found], dict[str, str]]:
    """Regular files below the root in name order, each real file once, by real path; and
    every directory entry that reaches one (its path in its real directory) -> real path."""
    found: dict[str, _Found] = {}
    reached: dict[str, str] = {}
    visited = {root_real}
    frames = [_Frame(root_display, (root_real,), _list(root_display, root_real, ring))]
    entries = 0
    while frames:
        frame = frames[-1]
        if frame.index >= len(frame.names):
            frames.pop()
            continue
        name = frame.names[frame.index]
        frame.index += 1
        entries += 1
        if entries > MAX_DIRECTORY_ENTRIES:
            ring.skip(root_display, f"more than {MAX_DIRECTORY_ENTRIES} entries; the rest not read")
            break
        display = os.path.join(frame.display, name)
        path = os.path.join(frame.ancestors[-1], name)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                if not os.path.exists(real):
                    try:
                        os.stat(path)
                    except OSError as e:
                        if e.errno == errno.ELOOP:
                            ring.skip_with_warning(display, "link loops (it never reaches a file)")
                            continue
                    ring.skip(display, "dangling link (its target does not exist)")
                    continue
                if os.path.commonpath([root_real, real]) != root_real:
                    ring.skip_with_warning(display, "link leads outside the key directory")
                    continue
                st = os.stat(real)
            else:
                real = path
        except OSError as e:
            ring.skip(display, f"cannot be read ({e.strerror})")
            continue
        if stat.S_ISDIR(st.st_mode):
            if real in frame.ancestors:
                ring.skip_with_warning(display, f"link loops back to {real}")
            elif real in visited:
                pass  # another name for a directory already walked, as a Secret's ..data is
            elif len(frame.ancestors) > MAX_DIRECTORY_DEPTH:
                ring.skip(display, f"deeper than {MAX_DIRECTORY_DEPTH} directory levels")
            else:
                visited.add(real)
                frames.append(_Frame(display, (*frame.ancestors, real), _list(display, real, ring)))
        elif stat.S_ISREG(st.st_mode):
            reached.setdefault(path, real)
            previous = found.get(real)
            if previous is None:
                found[real] = _Found(display, real)
            elif _is_hidden(previous.display) and not _is_hidden(display):
                found[real] = _Found(display, real)
        else:
            ring.skip(display, "not a regular file")
    return found, reached


def _list(display: str, real: str, ring: KeyRing) -> list[str]:
    try:
        return sorted(os.listdir(real))
    except OSError as e:
        ring.skip(display, f"directory cannot be listed ({e.strerror})")
        return []


def _is_hidden(path: str) -> bool:
    return any(part.startswith("..") for part in path.split(os.sep))


def _read_file(item: _Found, ring: KeyRing) -> bytes | None:
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the walk must not hang the decoder.
        fd = os.open(item.real, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                ring.skip(item.display, "not a regular file")
                return None
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        ring.skip(item.display, f"cannot be read ({e.strerror})")
        return None
    if len(data) > MAX_KEY_FILE_BYTES:
        ring.skip(item.display, "larger than 1 MiB, too large to be a key")
        return None
    return data


def strip_newline(data: bytes) -> bytes:
    """A password file's content without its one trailing newline (LF or CRLF)."""
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


# --- classification ---------------------------------------------------------------------


def _classify(data: bytes, password: bytes | None, source: str, ring: KeyRing) -> None:
    """Add what `data` holds to the ring, or record why it is of no use."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    stripped = data.strip()
    if not stripped:
        ring.skip(source, "empty file")
        return
    try:
        if b"-----BEGIN " in data:
            _classify_pem(data, password, source, ring)
        elif stripped.startswith(b"{"):
            _classify_jwk(stripped, source, ring)
        elif data[0] == 0x30:
            _classify_der(data, password, source, ring)
        else:
            _classify_other(data, source, ring)
    except Exception as e:  # a hostile or exotic file must never stop the walk
        # cryptography raises UnsupportedAlgorithm (and may raise more) for keys of kinds it
        # does not know; whatever a file makes a parser do, it is skipped with the reason.
        ring.skip(source, f"unreadable as a key ({type(e).__name__})")


def _classify_other(data: bytes, source: str, ring: KeyRing) -> None:
    if data[0] & 0x80:
        ring.skip(source, "binary OpenPGP keyring (PGP keys are not supported yet)")
    elif b"pkcs11:" in data:
        ring.skip(source, "PKCS#11 key file (PKCS#11 is not supported yet)")
    else:
        ring.skip(source, "not a private key, certificate or JWK")


def _private_key_loaders() -> Any:
    """cryptography's private-key loaders. `serialization.load_*_private_key` are these very
    functions of its Rust bindings; importing them from there skips the `serialization`
    package, whose SSH support costs ~5 ms of every decoder start."""
    try:
        from cryptography.hazmat.bindings._rust import openssl

        return openssl.keys
    except (ImportError, AttributeError):
        from cryptography.hazmat.primitives import serialization

        return serialization


def _classify_pem(data: bytes, password: bytes | None, source: str, ring: KeyRing) -> None:
    serialization = _private_key_loaders()

    blocks = _pem_blocks(data)
    if not blocks:
        if b"-----BEGIN PGP" in data:
            ring.skip(source, "armored OpenPGP key (PGP keys are not supported yet)")
        else:
            ring.skip(source, "PEM text with no complete block")
        return
    useful = False
    reasons: list[str] = []
    for kind, text in blocks:
        if kind in _PRIVATE_PEM_TYPES:
            if kind == b"ENCRYPTED PRIVATE KEY" and password is not None:
                too_costly = _kdf_too_costly(_pem_body(text))
                if too_costly:
                    reasons.append(too_costly)
                    continue
            key_or_reason = _load_private(
                lambda pw, t=text: serialization.load_pem_private_key(
                    t, pw, unsafe_skip_rsa_key_validation=True
                ),
                password,
            )
            if isinstance(key_or_reason, str):
                reasons.append(key_or_reason)
            else:
                useful |= _add_private(key_or_reason, source, ring, reasons)
        elif kind == b"CERTIFICATE":
            from cryptography import x509  # costs ~50 ms: only when a certificate is present

            try:
                cert = x509.load_pem_x509_certificate(text)
            except ValueError:
                reasons.append("malformed certificate")
                continue
            ring.certificates.append(CertificateEntry(source, cert))
            useful = True
        elif kind in _PUBLIC_PEM_TYPES:
            reasons.append("public key, not a private key")
        elif kind.startswith(b"PGP "):
            reasons.append("armored OpenPGP key (PGP keys are not supported yet)")
        elif kind not in _IGNORED_PEM_TYPES:
            reasons.append(f"PEM block {kind.decode()!r} is not a key or certificate")
    if not useful:
        ring.skip(source, "; ".join(reasons) or "no private key in the PEM text")


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole block) for each complete PEM block, found in one linear pass."""
    blocks = []
    pos = 0
    while (begin := _PEM_BEGIN.search(data, pos)) is not None:
        kind = begin.group(1)
        end_marker = b"-----END " + kind + b"-----"
        end = data.find(end_marker, begin.end())
        if end < 0:
            pos = begin.end()
            continue
        blocks.append((kind, data[begin.start() : end + len(end_marker)]))
        pos = end + len(end_marker)
    return blocks


def _pem_body(block: bytes) -> bytes:
    import binascii

    lines = block.splitlines()[1:-1]
    try:
        return binascii.a2b_base64(b"".join(line for line in lines if b":" not in line))
    except binascii.Error:
        return b""


# PKCS#5 / PKCS#12 password-based encryption identifiers (DER OID contents).
_OID_PBES2 = bytes.fromhex("2a864886f70d01050d")
_OID_PBKDF2 = bytes.fromhex("2a864886f70d01050c")
_OID_SCRYPT = bytes.fromhex("2b06010401da47040b")
_OID_PKCS12_PBE_PREFIX = bytes.fromhex("2a864886f70d010c01")


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, contents) items directly inside `data`; [] when it is not well-formed DER."""
    items = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            return []
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4 or pos + count > len(data):
                return []
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            return []
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _integers(data: bytes) -> list[int]:
    return [int.from_bytes(value, "big") for tag, value in _der_items(data) if tag == 0x02]


def _kdf_too_costly(der: bytes) -> str | None:
    """Why deriving the key of this EncryptedPrivateKeyInfo would take too long or too much
    memory: its iteration count and scrypt parameters are whatever its writer chose."""
    try:
        (_, info), *_ = _der_items(der)
        (_, algorithm), *_ = _der_items(info)
        (_, oid), (_, params), *_ = _der_items(algorithm)
        if oid == _OID_PBES2:
            (_, kdf), *_ = _der_items(params)
            (_, kdf_oid), (_, kdf_params), *_ = _der_items(kdf)
            values = _integers(kdf_params)
            if kdf_oid == _OID_PBKDF2 and values and values[0] > MAX_PBKDF2_ITERATIONS:
                return f"encrypted private key with {values[0]} PBKDF2 iterations (too costly)"
            if kdf_oid == _OID_SCRYPT and len(values) >= 3:
                n, r, p = values[:3]
                if 128 * n * r * max(p, 1) > MAX_SCRYPT_BYTES:
                    return "encrypted private key whose scrypt parameters are too costly"
        elif oid.startswith(_OID_PKCS12_PBE_PREFIX):
            values = _integers(params)
            if values and values[0] > MAX_PBKDF2_ITERATIONS:
                return f"encrypted private key with {values[0]} iterations (too costly)"
    except ValueError:  # not the expected structure: cryptography will say what it is
        return None
    return None


def _classify_der(data: bytes, password: bytes | None, source: str, ring: KeyRing) -> None:
    serialization = _private_key_loaders()

    if password is not None:
        too_costly = _kdf_too_costly(data)
        if too_costly:
            ring.skip(source, too_costly)
            return

    key_or_reason = _load_private(
        lambda pw: serialization.load_der_private_key(
            data, pw, unsafe_skip_rsa_key_validation=True
        ),
        password,
    )
    if not isinstance(key_or_reason, str):
        reasons: list[str] = []
        if not _add_private(key_or_reason, source, ring, reasons):
            ring.skip(source, "; ".join(reasons))
        return
    if "password" in key_or_reason:
        ring.skip(source, key_or_reason)
        return
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(data)
    except ValueError:
        pass
    else:
        ring.certificates.append(CertificateEntry(source, cert))
        return
    try:
        serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        ring.skip(source, "not a private key, certificate or JWK (unreadable DER)")
    else:
        ring.skip(source, "public key, not a private key")


def _load_private(loader: Any, password: bytes | None) -> Any:
    """Run a cryptography key loader; return the key, or a reason string on failure."""
    try:
        return loader(password)
    except TypeError as e:
        text = str(e)
        if "not encrypted" in text:  # a password was given for a plain key: not an error
            return _load_private(loader, None)
        if "not given" in text:
            return NO_PASSWORD
        return f"unusable private key ({text})"
    except ValueError as e:
        if password is not None and ("decrypt" in str(e).lower() or "password" in str(e).lower()):
            return WRONG_PASSWORD
        return "malformed or unsupported private key"
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for exotic keys
        return f"unsupported private key ({type(e).__name__})"


def _add_private(key: Any, source: str, ring: KeyRing, reasons: list[str]) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size > MAX_RSA_BITS:
            reasons.append(f"RSA key of {key.key_size} bits (at most {MAX_RSA_BITS} are used)")
            return False
        ring.private_keys.append(PrivateKey(source, key, f"RSA {key.key_size}"))
        return True
    from cryptography.hazmat.primitives.asymmetric import ec  # ~1.5 ms: only for non-RSA keys

    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = _EC_CURVES.get(key.curve.name)
        if curve is None:
            reasons.append(f"EC key on curve {key.curve.name}, which JWE cannot use")
            return False
        ring.private_keys.append(PrivateKey(source, key, f"EC {curve}"))
        return True
    reasons.append(f"{type(key).__name__.lstrip('_')} keys are not supported (RSA or EC only)")
    return False


def _b64url(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("member is not a string")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _int(value: Any) -> int:
    return int.from_bytes(_b64url(value), "big")


def _classify_jwk(data: bytes, source: str, ring: KeyRing) -> None:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        ring.skip(source, "JSON that is not a JWK")
        return
    jwks = obj.get("keys") if isinstance(obj, dict) and "kty" not in obj else [obj]
    if not isinstance(jwks, list) or not jwks:
        ring.skip(source, "JSON that is not a JWK")
        return
    reasons: list[str] = []
    useful = False
    for jwk in jwks:
        try:
            key_or_reason = private_key_from_jwk(jwk)
        except (ValueError, TypeError, KeyError):
            reasons.append("malformed JWK")
            continue
        if isinstance(key_or_reason, str):
            reasons.append(key_or_reason)
        else:
            useful |= _add_private(key_or_reason, source, ring, reasons)
    if not useful:
        ring.skip(source, "; ".join(reasons))


def private_key_from_jwk(jwk: Any) -> Any:
    """Build a cryptography private key from a JWK dict, or return why it cannot be one."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if not isinstance(jwk, dict) or "kty" not in jwk:
        return "JSON that is not a JWK"
    kty = jwk["kty"]
    if "d" not in jwk:
        return "public JWK, not a private key"
    if kty == "RSA":
        n, e, d = _int(jwk["n"]), _int(jwk["e"]), _int(jwk["d"])
        if n.bit_length() > MAX_RSA_BITS:
            return f"RSA JWK of {n.bit_length()} bits (at most {MAX_RSA_BITS} are used)"
        if "p" not in jwk or "q" not in jwk:
            return "RSA JWK without its primes p and q"
        p, q = _int(jwk["p"]), _int(jwk["q"])
        if p * q != n:
            return "RSA JWK whose primes do not multiply to its modulus"
        if all(k in jwk for k in ("dp", "dq", "qi")):
            dmp1, dmq1, iqmp = _int(jwk["dp"]), _int(jwk["dq"]), _int(jwk["qi"])
        else:
            dmp1 = rsa.rsa_crt_dmp1(d, p)
            dmq1 = rsa.rsa_crt_dmq1(d, q)
            iqmp = rsa.rsa_crt_iqmp(p, q)
        public = rsa.RSAPublicNumbers(e, n)
        return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, public).private_key()
    if kty == "EC":
        curves: dict[str, ec.EllipticCurve] = {
            "P-256": ec.SECP256R1(),
            "P-384": ec.SECP384R1(),
            "P-521": ec.SECP521R1(),
        }
        curve = curves.get(jwk.get("crv", ""))
        if curve is None:
            return f"EC JWK on unsupported curve {jwk.get('crv')!r}"
        key = ec.derive_private_key(_int(jwk["d"]), curve)
        numbers = key.public_key().public_numbers()
        if ("x" in jwk and _int(jwk["x"]) != numbers.x) or (
            "y" in jwk and _int(jwk["y"]) != numbers.y
        ):
            return "EC JWK whose public part does not match its private part"
        return key
    return f"JWK of type {kty!r} is not supported (RSA or EC only)"


# --- recipients (the encoder) -------------------------------------------------------------


def check_recipient_key(key: Any, source: str) -> Any:
    """Return an RSA or EC (P-256/384/521) public key, or raise KeyLoadError saying why not."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size > MAX_RSA_BITS:
            raise KeyLoadError(f"{source}: RSA key of {key.key_size} bits (at most {MAX_RSA_BITS})")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise KeyLoadError(f"{source}: EC key on curve {key.curve.name}, which JWE cannot use")
        return key
    name = type(key).__name__.lstrip("_").replace("PublicKey", "")
    raise KeyLoadError(f"{source}: {name} keys cannot be recipients (RSA or EC only)")


def load_public_key(data: bytes, source: str) -> Any:
    """A recipient's public key from PEM (PUBLIC KEY, RSA PUBLIC KEY, CERTIFICATE), DER
    (SubjectPublicKeyInfo or certificate) or a public JWK; raise KeyLoadError otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return _load_public_key(data, source)
    except UnsupportedAlgorithm as e:
        raise KeyLoadError(
            f"recipient key {source} is of a type this version cannot use ({e}); a jwe: "
            "recipient is an RSA or EC (P-256, P-384, P-521) public key or certificate"
        ) from e


def _load_public_key(data: bytes, source: str) -> Any:
    from cryptography.hazmat.primitives import serialization

    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    stripped = data.strip()
    if not stripped:
        raise KeyLoadError(f"{source} is empty")
    if b"-----BEGIN " in data:
        kinds = []
        for kind, text in _pem_blocks(data):
            kinds.append(kind)
            try:
                if kind in _PUBLIC_PEM_TYPES:
                    return check_recipient_key(serialization.load_pem_public_key(text), source)
                if kind == b"CERTIFICATE":
                    return check_recipient_key(load_certificate(text, source).public_key(), source)
            except ValueError as e:
                raise KeyLoadError(f"{source}: malformed {kind.decode()} ({e})") from e
        if set(kinds) & _PRIVATE_PEM_TYPES:
            raise KeyLoadError(
                f"{source} holds a private key; a recipient is given by its public key or "
                "certificate (openssl pkey -in KEY -pubout)"
            )
        raise KeyLoadError(f"{source} holds no public key or certificate in PEM")
    if stripped.startswith(b"{"):
        return check_recipient_key(_public_key_from_jwk(stripped, source), source)
    if data[0] == 0x30:
        try:
            return check_recipient_key(serialization.load_der_public_key(data), source)
        except (ValueError, TypeError):
            pass
        try:
            return check_recipient_key(load_certificate(data, source).public_key(), source)
        except KeyLoadError:
            pass
        try:
            serialization.load_der_private_key(data, None)
        except (ValueError, TypeError) as e:
            raise KeyLoadError(
                f"{source}: unreadable DER (not a public key or certificate)"
            ) from e
        raise KeyLoadError(f"{source} holds a private key; give the public key or certificate")
    raise KeyLoadError(f"{source} is not a public key, certificate or JWK")


def load_certificate(data: bytes, source: str) -> Certificate:
    """The first x509 certificate in PEM or DER data; raise KeyLoadError otherwise."""
    from cryptography import x509

    try:
        if b"-----BEGIN " in data:
            for kind, text in _pem_blocks(data):
                if kind == b"CERTIFICATE":
                    return x509.load_pem_x509_certificate(text)
            raise KeyLoadError(f"{source} holds no PEM CERTIFICATE block")
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise KeyLoadError(f"{source} is not a readable x509 certificate") from e


def _public_key_from_jwk(data: bytes, source: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise KeyLoadError(f"{source} is JSON that is not a JWK") from e
    if isinstance(obj, dict) and isinstance(obj.get("keys"), list) and len(obj["keys"]) == 1:
        obj = obj["keys"][0]
    if not isinstance(obj, dict) or "kty" not in obj:
        raise KeyLoadError(f"{source} is not a single JWK")
    if "d" in obj:
        raise KeyLoadError(f"{source} is a private JWK; give the public JWK")
    try:
        if obj["kty"] == "RSA":
            return rsa.RSAPublicNumbers(_int(obj["e"]), _int(obj["n"])).public_key()
        if obj["kty"] == "EC":
            curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
            curve = curves.get(str(obj.get("crv")))
            if curve is None:
                raise KeyLoadError(f"{source}: EC JWK on unsupported curve {obj.get('crv')!r}")
            numbers = ec.EllipticCurvePublicNumbers(_int(obj["x"]), _int(obj["y"]), curve)
            return numbers.public_key()
    except (KeyError, ValueError, TypeError) as e:
        raise KeyLoadError(f"{source} is a malformed JWK") from e
    raise KeyLoadError(f"{source}: JWK of type {obj['kty']!r} cannot be a recipient (RSA or EC)")


def classify_trying(
    data: bytes, passwords: list[tuple[bytes | None, str]], source: str, ring: KeyRing
) -> str | None:
    """Classify a key file with each (password, where it came from) in turn, keeping the
    first try that yields a private key (a file may hold certificates too, which do not
    count), else the last try's outcome; with no passwords, one try without. Returns where
    the kept password came from, None when no try yielded a key."""
    marks = (len(ring.private_keys), len(ring.certificates), len(ring.warnings),
             len(ring.skipped))
    for password, origin in passwords or [(None, "")]:
        del ring.private_keys[marks[0]:], ring.certificates[marks[1]:]
        del ring.warnings[marks[2]:], ring.skipped[marks[3]:]
        _classify(data, password, source, ring)
        if len(ring.private_keys) > marks[0]:
            return origin
    return None

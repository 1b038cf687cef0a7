"""PKCS#7 / CMS EnvelopedData key wrapping (RFC 5652), as ocicrypt writes and reads it through
smallstep/pkcs7 (go.mozilla.org/pkcs7 and fullsailor/pkcs7 before it).

This module owns the `pkcs7` scheme: a small lenient DER/BER reader for ContentInfo(envelopedData)
and the matching DER writer, unwrapping with an RSA key plus its x509 certificate, `describe`,
and `wrap` for the encoder. Key transport: RSA PKCS#1 v1.5 and RSAES-OAEP; recipients named by
IssuerAndSerialNumber or SubjectKeyIdentifier. Content encryption: AES-128/192/256-GCM with
either the parameter encoding the Go library writes or the RFC 5084 one, AES-128/192/256-CBC
and DES-EDE3-CBC. cryptography's own PKCS#7 API cannot read ocicrypt's AES-GCM envelopes, so
only its RSA and cipher primitives are used, imported when needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from decoder.errors import KeyLoadError
from decoder.keys import CertificateEntry, KeyRing, PrivateKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
    from cryptography.x509 import Certificate

MAX_RECIPIENTS = 256
MAX_DEPTH = 32
MAX_ELEMENTS = 65536
_DESCRIBED_RECIPIENTS = 8
_MAX_TRIALS = 64  # RSA decryptions spent finding which key lacks its certificate
_MAX_TEXT = 64

# Universal tag numbers
_INTEGER, _OCTET_STRING, _NULL, _OID, _SEQUENCE, _SET = 2, 4, 5, 6, 16, 17
_UNIVERSAL, _CONTEXT = 0, 2

# Object identifiers, as the contents octets of their DER encoding
_OID_ENVELOPED_DATA = bytes.fromhex("2a864886f70d010703")  # 1.2.840.113549.1.7.3
_OID_DATA = bytes.fromhex("2a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_RSA = bytes.fromhex("2a864886f70d010101")  # rsaEncryption: PKCS#1 v1.5 key transport
_OID_RSAES_OAEP = bytes.fromhex("2a864886f70d010107")
_OID_MGF1 = bytes.fromhex("2a864886f70d010108")
_OID_P_SPECIFIED = bytes.fromhex("2a864886f70d010109")
_OID_DES_EDE3_CBC = bytes.fromhex("2a864886f70d0307")
_HASHES = {
    bytes.fromhex("2b0e03021a"): "SHA1",
    bytes.fromhex("608648016503040204"): "SHA224",
    bytes.fromhex("608648016503040201"): "SHA256",
    bytes.fromhex("608648016503040202"): "SHA384",
    bytes.fromhex("608648016503040203"): "SHA512",
}
_AES_GCM = {
    bytes.fromhex("608648016503040106"): 16,
    bytes.fromhex("60864801650304011a"): 24,
    bytes.fromhex("60864801650304012e"): 32,
}
_AES_CBC = {
    bytes.fromhex("608648016503040102"): 16,
    bytes.fromhex("608648016503040116"): 24,
    bytes.fromhex("60864801650304012a"): 32,
}
_KNOWN_CONTENT_TYPES = {
    bytes.fromhex("2a864886f70d010701"): "data",
    bytes.fromhex("2a864886f70d010702"): "signedData",
    bytes.fromhex("2a864886f70d010706"): "encryptedData",
    bytes.fromhex("2a864886f70d0109100117"): "authEnvelopedData",
}
_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "emailAddress",
}
# Universal string tag numbers in names -> codec: UTF8String, PrintableString, IA5String,
# VisibleString, T61String (read as Latin-1), BMPString, UniversalString
_STRING_CODECS = {
    12: "utf-8",
    19: "ascii",
    22: "ascii",
    26: "ascii",
    20: "latin-1",
    30: "utf-16-be",
    28: "utf-32-be",
}

# What wrap() can write, by name: (content cipher OID, key bytes, mode)
CONTENT_ENCRYPTIONS = {
    "aes-128-gcm": (bytes.fromhex("608648016503040106"), 16, "gcm"),
    "aes-192-gcm": (bytes.fromhex("60864801650304011a"), 24, "gcm"),
    "aes-256-gcm": (bytes.fromhex("60864801650304012e"), 32, "gcm"),
    "aes-128-cbc": (bytes.fromhex("608648016503040102"), 16, "cbc"),
    "aes-192-cbc": (bytes.fromhex("608648016503040116"), 24, "cbc"),
    "aes-256-cbc": (bytes.fromhex("60864801650304012a"), 32, "cbc"),
}
_GCM_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16


class PKCS7FormatError(ValueError):
    """The blob is not an EnvelopedData this module can read."""


# --- DER / BER reading ------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One decoded TLV, holding offsets into the blob rather than copies of it."""

    data: bytes
    cls: int
    constructed: bool
    number: int
    start: int
    content_start: int
    content_end: int
    end: int
    children: tuple[Element, ...]

    @property
    def content(self) -> bytes:
        return self.data[self.content_start : self.content_end]

    @property
    def raw(self) -> bytes:
        return self.data[self.start : self.end]

    def is_universal(self, number: int) -> bool:
        return self.cls == _UNIVERSAL and self.number == number


def read_der(data: bytes) -> Element:
    """Decode one element that spans all of `data`. BER indefinite lengths and constructed
    strings are accepted; depth and element count are bounded."""
    budget = [MAX_ELEMENTS]
    element, end = _element(data, 0, len(data), 0, budget)
    if end != len(data):
        raise PKCS7FormatError("trailing data after the outer element")
    return element


def _element(
    data: bytes, pos: int, limit: int, depth: int, budget: list[int]
) -> tuple[Element, int]:
    if depth > MAX_DEPTH:
        raise PKCS7FormatError(f"elements nested more than {MAX_DEPTH} deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise PKCS7FormatError(f"more than {MAX_ELEMENTS} elements")
    start = pos
    if pos >= limit:
        raise PKCS7FormatError("truncated element")
    first = data[pos]
    pos += 1
    cls, constructed, number = first >> 6, bool(first & 0x20), first & 0x1F
    if number == 0x1F:  # high tag number form: base-128 digits
        number = 0
        for _ in range(4):
            if pos >= limit:
                raise PKCS7FormatError("truncated tag")
            digit = data[pos]
            pos += 1
            number = number << 7 | digit & 0x7F
            if not digit & 0x80:
                break
        else:
            raise PKCS7FormatError("tag number too large")
    if pos >= limit:
        raise PKCS7FormatError("truncated length")
    length = data[pos]
    pos += 1
    if length == 0x80:  # BER indefinite length: contents end with two zero octets
        if not constructed:
            raise PKCS7FormatError("indefinite length on a primitive element")
        nested, end = _children(data, pos, limit, True, depth + 1, budget)
        return Element(data, cls, True, number, start, pos, end - 2, end, nested), end
    if length & 0x80:
        count = length & 0x7F
        if count > 4:
            raise PKCS7FormatError("length too large")
        if pos + count > limit:
            raise PKCS7FormatError("truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if length > limit - pos:
        raise PKCS7FormatError("element longer than the data holding it")
    end = pos + length
    children: tuple[Element, ...] = ()
    if constructed:
        children, _ = _children(data, pos, end, False, depth + 1, budget)
    return Element(data, cls, constructed, number, start, pos, end, end, children), end


def _children(
    data: bytes, pos: int, limit: int, indefinite: bool, depth: int, budget: list[int]
) -> tuple[tuple[Element, ...], int]:
    items: list[Element] = []
    while True:
        if indefinite:
            if data[pos : pos + 2] == b"\0\0" and pos + 2 <= limit:
                return tuple(items), pos + 2
            if pos >= limit:
                raise PKCS7FormatError("indefinite-length element without an end")
        elif pos == limit:
            return tuple(items), pos
        element, pos = _element(data, pos, limit, depth, budget)
        items.append(element)


def _expect(element: Element | None, number: int, what: str) -> Element:
    if element is None or not element.is_universal(number):
        raise PKCS7FormatError(f"{what} is missing or has the wrong type")
    return element


def _octets(element: Element) -> bytes:
    """The value of an OCTET STRING, primitive or (BER) constructed from pieces."""
    if not element.constructed:
        return element.content
    return b"".join(_octets(piece) for piece in element.children)


def _integer(element: Element, what: str) -> int:
    if not element.is_universal(_INTEGER) or element.constructed or not element.content:
        raise PKCS7FormatError(f"{what} is not an INTEGER")
    return int.from_bytes(element.content, "big", signed=True)


def _oid(element: Element | None, what: str) -> bytes:
    element = _expect(element, _OID, what)
    if element.constructed or not element.content:
        raise PKCS7FormatError(f"{what} is not an OBJECT IDENTIFIER")
    return element.content


def _at(items: tuple[Element, ...], index: int) -> Element | None:
    return items[index] if index < len(items) else None


# --- EnvelopedData ----------------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    oid: bytes
    parameters: Element | None


@dataclass(frozen=True)
class Recipient:
    """A KeyTransRecipientInfo: who it is for, and the content key wrapped for them."""

    issuer: bytes | None  # the DER Name, exactly as in the certificate
    serial: int | None
    key_id: bytes | None  # subjectKeyIdentifier, when that names the recipient instead
    algorithm: Algorithm
    encrypted_key: bytes


@dataclass(frozen=True)
class Envelope:
    recipients: list[Recipient]
    other_recipients: int  # key agreement, KEK, password or other kinds: none use an RSA key
    content_algorithm: Algorithm
    encrypted_content: bytes | None


def parse(blob: bytes) -> Envelope:
    """Parse a DER (or BER) ContentInfo holding an EnvelopedData."""
    info = read_der(blob)
    if not info.is_universal(_SEQUENCE) or len(info.children) < 2:
        raise PKCS7FormatError("not a ContentInfo")
    content_type = _oid(info.children[0], "contentType")
    if content_type != _OID_ENVELOPED_DATA:
        name = _KNOWN_CONTENT_TYPES.get(content_type) or _oid_text(content_type)
        raise PKCS7FormatError(f"content type {name} is not envelopedData")
    explicit = info.children[1]
    if explicit.cls != _CONTEXT or explicit.number != 0 or len(explicit.children) != 1:
        raise PKCS7FormatError("content is not an explicitly tagged [0] element")
    fields = _expect(explicit.children[0], _SEQUENCE, "EnvelopedData").children
    _integer(_expect(_at(fields, 0), _INTEGER, "EnvelopedData version"), "version")
    index = 1
    if (originator := _at(fields, index)) is not None and originator.cls == _CONTEXT:
        index += 1  # originatorInfo [0]: certificates and CRLs, not needed to decrypt
    infos = _expect(_at(fields, index), _SET, "recipientInfos")
    content_info = _expect(_at(fields, index + 1), _SEQUENCE, "encryptedContentInfo")
    recipients = []
    others = 0
    for info_element in infos.children:
        if info_element.is_universal(_SEQUENCE):
            recipients.append(_recipient(info_element))
        else:
            others += 1
    items = content_info.children
    _oid(_at(items, 0), "encryptedContentInfo contentType")
    algorithm = _algorithm(_at(items, 1), "contentEncryptionAlgorithm")
    encrypted = None
    if (content := _at(items, 2)) is not None:
        if content.cls != _CONTEXT or content.number != 0:
            raise PKCS7FormatError("encryptedContent is not tagged [0]")
        encrypted = _octets(content)
    return Envelope(recipients, others, algorithm, encrypted)


def _algorithm(element: Element | None, what: str) -> Algorithm:
    items = _expect(element, _SEQUENCE, what).children
    return Algorithm(_oid(_at(items, 0), f"{what} algorithm"), _at(items, 1))


def _recipient(element: Element) -> Recipient:
    items = element.children
    if len(items) != 4:
        raise PKCS7FormatError("a KeyTransRecipientInfo does not have four fields")
    _integer(items[0], "RecipientInfo version")
    rid = items[1]
    issuer = serial = key_id = None
    if rid.is_universal(_SEQUENCE) and len(rid.children) == 2:
        name = _expect(rid.children[0], _SEQUENCE, "issuer")
        issuer, serial = name.raw, _integer(rid.children[1], "serialNumber")
    elif rid.cls == _CONTEXT and rid.number == 0:
        key_id = _octets(rid)
    else:
        raise PKCS7FormatError("a RecipientInfo names its recipient in an unknown way")
    algorithm = _algorithm(items[2], "keyEncryptionAlgorithm")
    encrypted_key = _octets(_expect(items[3], _OCTET_STRING, "encryptedKey"))
    return Recipient(issuer, serial, key_id, algorithm, encrypted_key)


# --- describe -----------------------------------------------------------------------------


def _oid_text(oid: bytes) -> str:
    if len(oid) > 32:
        return "a long OID"
    arcs: list[int] = []
    value = 0
    for octet in oid:
        value = value << 7 | octet & 0x7F
        if not octet & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return "an unreadable OID"
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in [first, arcs[0] - 40 * first, *arcs[1:]])


def _escape(value: str) -> str:
    text = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _name_text(raw: bytes) -> str:
    """An RFC 4514-style string (last RDN first) for a DER Name; never raises."""
    try:
        rdns = _expect(read_der(raw), _SEQUENCE, "Name").children
        parts = []
        for rdn in reversed(rdns):
            values = []
            for attribute in _expect(rdn, _SET, "RDN").children:
                kind, value = _expect(attribute, _SEQUENCE, "attribute").children[:2]
                oid = _oid_text(_oid(kind, "attribute type"))
                codec = _STRING_CODECS.get(value.number) if value.cls == _UNIVERSAL else None
                text = (
                    _escape(value.content.decode(codec, "replace"))
                    if codec and not value.constructed
                    else "#" + value.raw.hex()[:_MAX_TEXT]
                )
                values.append(f"{_ATTRIBUTE_NAMES.get(oid, oid)}={text}")
            parts.append("+".join(values))
    except (PKCS7FormatError, ValueError):
        return "an unreadable name"
    return ",".join(parts) if parts else "an empty name"


def _recipient_text(recipient: Recipient) -> str:
    if recipient.key_id is not None:
        return f"subject key id {recipient.key_id.hex()[:_MAX_TEXT]}"
    serial = recipient.serial or 0
    hex_serial = f"{'-' if serial < 0 else ''}0x{abs(serial):x}"
    if len(hex_serial) > _MAX_TEXT:
        hex_serial = hex_serial[:_MAX_TEXT] + "..."
    return f"issuer {_name_text(recipient.issuer or b'')} serial {hex_serial}"


def names_certificate(blobs: list[bytes], certificate: Certificate) -> bool:
    """Whether a RecipientInfo of the blobs names the certificate (issuer and serial, or
    subject key identifier), so wrapping for it again would add a duplicate."""
    identity = _identity(certificate)
    if identity is None:
        return False
    for blob in blobs:
        try:
            envelope = parse(blob)
        except PKCS7FormatError:
            continue
        if any(identity.names(recipient) for recipient in envelope.recipients):
            return True
    return False


def describe(blobs: list[bytes]) -> str:
    """Say which certificates (issuer and serial) the PKCS7 blobs are wrapped for."""
    names: list[str] = []
    count = 0

    def add(text: str) -> None:
        nonlocal count
        count += 1
        if len(names) < _DESCRIBED_RECIPIENTS:
            names.append(text)

    for blob in blobs:
        try:
            envelope = parse(blob)
        except PKCS7FormatError:
            add("an unreadable PKCS7")
            continue
        for recipient in envelope.recipients:
            add(_recipient_text(recipient) if len(names) < _DESCRIBED_RECIPIENTS else "")
        for _ in range(envelope.other_recipients):
            add("a recipient without RSA key transport")
    shown = ", ".join(names)
    if count > _DESCRIBED_RECIPIENTS:
        shown += f" and {count - _DESCRIBED_RECIPIENTS} more"
    return f"PKCS7 ({count} recipient{'s' if count != 1 else ''}: {shown})"


# --- unwrap -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Content:
    name: str
    cipher: str  # "aes-gcm", "aes-cbc" or "des-ede3-cbc"
    key_bytes: int
    iv: bytes
    tag_bytes: int  # AES-GCM only


def _items(data: bytes) -> tuple[Element, ...]:
    return _children(data, 0, len(data), False, 0, [MAX_ELEMENTS])[0]


def _content_cipher(algorithm: Algorithm) -> _Content | None:
    """The content cipher and its IV, None when the algorithm is not supported."""
    oid, parameters = algorithm.oid, algorithm.parameters
    if oid in _AES_GCM:
        size = _AES_GCM[oid]
        nonce, tag_bytes = _gcm_parameters(parameters)
        return _Content(f"AES-{8 * size}-GCM", "aes-gcm", size, nonce, tag_bytes)
    if oid in _AES_CBC:
        size = _AES_CBC[oid]
        return _Content(f"AES-{8 * size}-CBC", "aes-cbc", size, _cbc_iv(parameters, 16), 0)
    if oid == _OID_DES_EDE3_CBC:
        return _Content("DES-EDE3-CBC", "des-ede3-cbc", 24, _cbc_iv(parameters, 8), 0)
    return None


def _gcm_parameters(parameters: Element | None) -> tuple[bytes, int]:
    if parameters is None or not parameters.is_universal(_SEQUENCE):
        raise PKCS7FormatError("AES-GCM parameters are missing")
    # Go's pkcs7 packages write a universal tag-16 element WITHOUT the constructed bit whose
    # contents are their whole marshalled aesGCMParameters SEQUENCE, nonce tagged [4]
    # IMPLICIT, and read the parameters back the same way. RFC 5084 has the SEQUENCE itself:
    # nonce OCTET STRING, ICV length INTEGER DEFAULT 12.
    items = parameters.children if parameters.constructed else _items(parameters.content)
    if len(items) == 1 and items[0].is_universal(_SEQUENCE) and items[0].constructed:
        items = items[0].children
    if not items or items[0].number != 4 or items[0].cls not in (_UNIVERSAL, _CONTEXT):
        raise PKCS7FormatError("AES-GCM parameters have no nonce")
    if len(items) > 2:
        raise PKCS7FormatError("AES-GCM parameters have extra fields")
    nonce = _octets(items[0])
    tag_bytes = _integer(items[1], "AES-GCM ICV length") if len(items) == 2 else 12
    if not 12 <= tag_bytes <= 16:
        raise PKCS7FormatError(f"AES-GCM ICV length {tag_bytes} is not between 12 and 16")
    if not 8 <= len(nonce) <= 128:
        raise PKCS7FormatError(f"AES-GCM nonce of {len(nonce)} bytes")
    return nonce, tag_bytes


def _cbc_iv(parameters: Element | None, size: int) -> bytes:
    if parameters is None or not parameters.is_universal(_OCTET_STRING):
        raise PKCS7FormatError("CBC parameters are not an OCTET STRING IV")
    iv = _octets(parameters)
    if len(iv) != size:
        raise PKCS7FormatError(f"CBC IV of {len(iv)} bytes, not {size}")
    return iv


def _paddings(algorithm: Algorithm) -> list[AsymmetricPadding] | str:
    """The RSA paddings to try for this key transport, or why it cannot be used."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if algorithm.oid == _OID_RSA:
        return [padding.PKCS1v15()]
    if algorithm.oid != _OID_RSAES_OAEP:
        return f"key encryption {_oid_text(algorithm.oid)} is not supported"
    hash_classes: dict[str, type[hashes.HashAlgorithm]] = {
        "SHA1": hashes.SHA1,
        "SHA224": hashes.SHA224,
        "SHA256": hashes.SHA256,
        "SHA384": hashes.SHA384,
        "SHA512": hashes.SHA512,
    }
    try:
        hash_name, mgf_name, label = _oaep_parameters(algorithm.parameters)
    except PKCS7FormatError as e:
        return f"RSAES-OAEP {e}"
    digest = hash_classes[hash_name]()
    # RFC 4055: an absent maskGenAlgorithm means MGF1 with SHA-1, but Go's pkcs7 writes only
    # the hash and masks with that same hash.
    mgf_names = [mgf_name] if mgf_name else list(dict.fromkeys([hash_name, "SHA1"]))
    return [
        padding.OAEP(padding.MGF1(hash_classes[name]()), digest, label or None)
        for name in mgf_names
    ]


def _oaep_parameters(parameters: Element | None) -> tuple[str, str | None, bytes]:
    hash_name, mgf_name, label = "SHA1", None, b""
    if parameters is None or parameters.is_universal(_NULL):
        return hash_name, mgf_name, label
    for field in _expect(parameters, _SEQUENCE, "parameters").children:
        if field.cls != _CONTEXT or len(field.children) != 1:
            raise PKCS7FormatError("parameters are malformed")
        inner = _algorithm(field.children[0], "OAEP parameter")
        if field.number == 0:
            hash_name = _hash_name(inner.oid)
        elif field.number == 1:
            if inner.oid != _OID_MGF1:
                raise PKCS7FormatError(f"mask generation {_oid_text(inner.oid)} is not supported")
            mgf_name = _hash_name(_algorithm(inner.parameters, "MGF1 hash").oid)
        elif field.number == 2:
            if inner.oid != _OID_P_SPECIFIED:
                raise PKCS7FormatError(f"label source {_oid_text(inner.oid)} is not supported")
            if inner.parameters is not None:
                label = _octets(_expect(inner.parameters, _OCTET_STRING, "OAEP label"))
    return hash_name, mgf_name, label


def _hash_name(oid: bytes) -> str:
    if oid not in _HASHES:
        raise PKCS7FormatError(f"hash {_oid_text(oid)} is not supported")
    return _HASHES[oid]


@dataclass(frozen=True)
class _Identity:
    """What a RecipientInfo may name a certificate by."""

    issuer: bytes  # raw DER, as Go's Certificate.RawIssuer
    serial: int
    key_id: bytes | None

    def names(self, recipient: Recipient) -> bool:
        if recipient.key_id is not None:
            return recipient.key_id == self.key_id
        return recipient.serial == self.serial and recipient.issuer == self.issuer


def _identity(certificate: Certificate) -> _Identity | None:
    from cryptography import x509

    try:
        fields = _expect(read_der(certificate.tbs_certificate_bytes), _SEQUENCE, "TBS").children
        first = 1 if fields and fields[0].cls == _CONTEXT else 0  # [0] EXPLICIT version
        issuer = _expect(_at(fields, first + 2), _SEQUENCE, "issuer").raw
    except PKCS7FormatError:
        return None
    try:
        key_id: bytes | None = certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        key_id = None
    return _Identity(issuer, certificate.serial_number, key_id)


@dataclass(frozen=True)
class _Holder:
    """A private key together with a certificate for its public key."""

    key: PrivateKey
    certificate: CertificateEntry
    identity: _Identity


def _holders(keys: list[PrivateKey], certificates: list[CertificateEntry]) -> list[_Holder]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import rsa

    numbers = [(key, key.key.public_key().public_numbers()) for key in keys]
    holders: list[_Holder] = []
    for entry in certificates:
        try:
            public = entry.certificate.public_key()
        except (ValueError, UnsupportedAlgorithm):
            continue
        if not isinstance(public, rsa.RSAPublicKey):
            continue
        identity = _identity(entry.certificate)
        if identity is None:
            continue
        holders.extend(
            _Holder(key, entry, identity)
            for key, key_numbers in numbers
            if key_numbers == public.public_numbers()
        )
    return holders


def _content_key(
    private: Any, recipient: Recipient, paddings: list[AsymmetricPadding], size: int
) -> bytes | None:
    from cryptography.hazmat.primitives.asymmetric import padding

    for pad in paddings:
        if isinstance(pad, padding.PKCS1v15):
            try:
                key: bytes = private.decrypt(recipient.encrypted_key, pad)
            except ValueError:
                key = b""
            # RFC 3218 section 2.3.2: on a padding error go on with a random key, so that it
            # fails later exactly as a wrong key does (no Bleichenbacher oracle).
            return key if len(key) == size else os.urandom(size)
        try:
            key = private.decrypt(recipient.encrypted_key, pad)
        except ValueError:
            continue
        if len(key) == size:
            return key
    return None


def _decrypt_content(content: _Content, key: bytes, ciphertext: bytes) -> bytes | None:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import padding as sym_padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if content.cipher == "aes-gcm":
        if len(ciphertext) < content.tag_bytes:
            return None
        body, tag = ciphertext[: -content.tag_bytes], ciphertext[-content.tag_bytes :]
        try:
            decryptor = Cipher(
                algorithms.AES(key), modes.GCM(content.iv, tag, min_tag_length=content.tag_bytes)
            ).decryptor()
            return decryptor.update(body) + decryptor.finalize()
        except (InvalidTag, ValueError):
            return None
    block = len(content.iv)
    if not ciphertext or len(ciphertext) % block:
        return None
    cipher: Any
    if content.cipher == "aes-cbc":
        cipher = algorithms.AES(key)
    else:
        try:
            from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        except ImportError:  # cryptography before 43
            return None
        cipher = TripleDES(key)
    cbc = Cipher(cipher, modes.CBC(content.iv)).decryptor()
    unpadder = sym_padding.PKCS7(8 * block).unpadder()
    try:
        padded = cbc.update(ciphertext) + cbc.finalize()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None


@dataclass(frozen=True)
class _Readable:
    """A blob that parsed, kept to explain afterwards why no key opened it."""

    index: int
    recipients: list[Recipient]
    content: _Content
    ciphertext: bytes


def unwrap(blobs: list[bytes], ring: KeyRing, notes: list[str]) -> bytes | None:
    """The PKCS7 plaintext (ocicrypt's private options) from the first blob that a private key
    with its certificate opens."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = [k for k in ring.private_keys if isinstance(k.key, rsa.RSAPrivateKey)]
    holders = _holders(keys, ring.certificates)
    readable: list[_Readable] = []
    for index, blob in enumerate(blobs, start=1):
        try:
            envelope = parse(blob)
            content = _content_cipher(envelope.content_algorithm)
        except PKCS7FormatError as e:
            notes.append(f"PKCS7 {index} is malformed: {e}")
            continue
        if content is None:
            name = _oid_text(envelope.content_algorithm.oid)
            notes.append(f"PKCS7 {index}: content encryption {name} is not supported")
            continue
        if envelope.encrypted_content is None:
            notes.append(f"PKCS7 {index} has no encrypted content")
            continue
        recipients = envelope.recipients
        if len(recipients) > MAX_RECIPIENTS:
            notes.append(
                f"PKCS7 {index} has {len(recipients)} recipients; only the first "
                f"{MAX_RECIPIENTS} were tried"
            )
            recipients = recipients[:MAX_RECIPIENTS]
        item = _Readable(index, recipients, content, envelope.encrypted_content)
        plaintext = _open(item, holders, notes)
        if plaintext is not None:
            return plaintext
        readable.append(item)
    if readable and not keys:
        notes.append(
            "PKCS7 needs an RSA private key with its x509 certificate; no RSA key was found"
        )
    _explain(readable, keys, holders, ring.certificates, notes)
    return None


def _open(item: _Readable, holders: list[_Holder], notes: list[str]) -> bytes | None:
    unsupported: set[str] = set()
    for recipient in item.recipients:
        for holder in holders:
            if not holder.identity.names(recipient):
                continue
            paddings = _paddings(recipient.algorithm)
            if isinstance(paddings, str):
                unsupported.add(paddings)
                continue
            cek = _content_key(holder.key.key, recipient, paddings, item.content.key_bytes)
            plaintext = (
                None if cek is None else _decrypt_content(item.content, cek, item.ciphertext)
            )
            if plaintext is not None:
                return plaintext
            # The same words whatever failed: RSA padding, key length, tag or CBC padding.
            notes.append(
                f"{holder.key.source} with certificate {holder.certificate.source} does not "
                f"open its PKCS7 {item.index} recipient ({_recipient_text(recipient)}): "
                "tampered wrapped key or content"
            )
    notes.extend(f"PKCS7 {item.index}: {reason}" for reason in sorted(unsupported))
    return None


def _explain(
    readable: list[_Readable],
    keys: list[PrivateKey],
    holders: list[_Holder],
    certificates: list[CertificateEntry],
    notes: list[str],
) -> None:
    """Notes for the two ways a key and its certificate fail to meet: a certificate naming a
    recipient whose key is absent, and a key whose certificate is absent."""
    held = {id(holder.certificate) for holder in holders}
    for entry in certificates:
        if id(entry) in held:
            continue
        identity = _identity(entry.certificate)
        for item in readable:
            named = [r for r in item.recipients if identity and identity.names(r)]
            if named:
                notes.append(
                    f"certificate {entry.source} names PKCS7 {item.index} recipient "
                    f"({_recipient_text(named[0])}) but no private key for it was found"
                )
    with_certificate = {id(holder.key) for holder in holders}
    keyless = [key for key in keys if id(key) not in with_certificate]
    if not keyless or not readable:
        return
    advice = (
        "PKCS7 needs the key's x509 certificate as well (ocicrypt requires it too): put the "
        "certificate beside the key in the key directory, or in the same PEM file, or pass "
        "it as x509s"
    )
    trials = [_MAX_TRIALS]
    for key in keyless:
        for item in readable:
            recipient = _opened_without_certificate(key, item, trials)
            if recipient is not None:
                notes.append(
                    f"{key.source} opens PKCS7 {item.index} recipient "
                    f"({_recipient_text(recipient)}) but no certificate for it was found; "
                    f"{advice}"
                )
                return
    sources = ", ".join(key.source for key in keyless[:4])
    if len(keyless) > 4:
        sources += f" and {len(keyless) - 4} more"
    notes.append(f"no x509 certificate was found for {sources}; {advice}")


def _opened_without_certificate(
    key: PrivateKey, item: _Readable, trials: list[int]
) -> Recipient | None:
    """The recipient this key opens, judged by AES-GCM's tag (CBC padding proves nothing)."""
    if item.content.cipher != "aes-gcm":
        return None
    size = (key.key.key_size + 7) // 8
    for recipient in item.recipients:
        paddings = _paddings(recipient.algorithm)
        if isinstance(paddings, str) or len(recipient.encrypted_key) != size:
            continue
        trials[0] -= 1
        if trials[0] < 0:
            return None
        cek = _content_key(key.key, recipient, paddings, item.content.key_bytes)
        if cek is not None and _decrypt_content(item.content, cek, item.ciphertext) is not None:
            return recipient
    return None


# --- wrap ---------------------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _der_integer(value: int) -> bytes:
    size = (value if value >= 0 else ~value).bit_length() // 8 + 1
    return _der(0x02, value.to_bytes(size, "big", signed=True))


def _rsa_public_key(certificate: Certificate) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    subject = certificate.subject.rfc4514_string()
    try:
        public = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyLoadError(f"PKCS7 recipient certificate {subject} has an unusable key") from e
    if isinstance(public, rsa.RSAPublicKey):
        return public
    if isinstance(public, ec.EllipticCurvePublicKey):
        kind = "an EC"
    elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        kind = "an EdDSA"
    elif isinstance(public, dsa.DSAPublicKey):
        kind = "a DSA"
    else:
        kind = "a non-RSA"
    raise KeyLoadError(
        f"PKCS7 recipient certificate {subject} has {kind} key; PKCS7 wraps keys for RSA "
        "certificates only (use jwe: for EC keys)"
    )


def wrap(
    plaintext: bytes,
    certificates: list[Certificate],
    *,
    content_encryption: str = "aes-128-gcm",
) -> bytes:
    """A DER ContentInfo(envelopedData) of `plaintext` for every certificate, as ocicrypt
    writes it: RSA PKCS#1 v1.5 key transport to IssuerAndSerialNumber recipients (version 0)
    and AES-128-GCM content with the parameter encoding Go's pkcs7 reads. The AES-CBC
    choices exist for tools that cannot read that encoding (openssl)."""
    from cryptography.hazmat.primitives import padding as sym_padding
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not certificates:
        raise ValueError("PKCS7 wrapping needs at least one recipient certificate")
    if content_encryption not in CONTENT_ENCRYPTIONS:
        raise ValueError(f"unknown PKCS7 content encryption {content_encryption!r}")
    oid, size, mode = CONTENT_ENCRYPTIONS[content_encryption]
    public_keys = [(_rsa_public_key(c), c) for c in certificates]
    key = os.urandom(size)
    infos = []
    for public, certificate in public_keys:
        identity = _identity(certificate)
        if identity is None:
            raise KeyLoadError(
                f"PKCS7 recipient certificate {certificate.subject.rfc4514_string()} "
                "has no readable issuer"
            )
        issuer_and_serial = identity.issuer + _der_integer(identity.serial)
        infos.append(
            _der(
                0x30,
                _der_integer(0)
                + _der(0x30, issuer_and_serial)
                + _der(0x30, _der(0x06, _OID_RSA))  # no NULL parameters, as Go writes it
                + _der(0x04, public.encrypt(key, padding.PKCS1v15())),
            )
        )
    if mode == "gcm":
        nonce = os.urandom(_GCM_NONCE_BYTES)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, None)
        gcm_parameters = _der(0x30, _der(0x84, nonce) + _der_integer(_GCM_TAG_BYTES))
        parameters = _der(0x10, gcm_parameters)  # primitive tag 16 around it: see above
    else:
        iv = os.urandom(16)
        padder = sym_padding.PKCS7(128).padder()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        padded = padder.update(plaintext) + padder.finalize()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        parameters = _der(0x04, iv)
    content_info = _der(
        0x30,
        _der(0x06, _OID_DATA)
        + _der(0x30, _der(0x06, oid) + parameters)
        + _der(0xA0, _der(0x04, ciphertext)),  # constructed [0] around one OCTET STRING
    )
    enveloped = _der(0x30, _der_integer(0) + _der(0x31, b"".join(sorted(infos))) + content_info)
    return _der(0x30, _der(0x06, _OID_ENVELOPED_DATA) + _der(0xA0, enveloped))

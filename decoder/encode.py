"""The encoder pipeline, and the only module that knows its order:
SRC layout -> image tree (indexes, manifests) -> selected platforms and layers -> a plan per
layer -> layer work (encrypt, add recipients, decrypt) -> new manifests and index -> DST.

Everything that can be refused (recipients, keys, platforms, layer indexes, wrapped keys,
malformed manifests) is checked while planning, before the first byte is written. Layers
are encrypted with `layercipher.encrypt_stream`, their private options wrapped per scheme
(`keywrap.jwe`, `keywrap.pkcs7`); a layer already encrypted keeps its ciphertext and gets the
new recipients appended, after --key has opened its options. `layerinfo` reads the same tree.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from decoder import keys, keywrap, layercipher, ocilayout
from decoder.errors import (
    DecoderError,
    IntegrityError,
    KeyLoadError,
    LayerOptionsError,
    LayoutError,
    NoMatchingKeyError,
    UsageError,
)
from decoder.keywrap import jwe
from decoder.ocilayout import Layout, Location
from decoder.spec import (
    ANNOTATION_PREFIX,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_TO_OCI,
    ENCRYPTED_TO_PLAIN,
    FOREIGN_LAYERS,
    KEYS_ANNOTATION_PREFIX,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    PLAIN_TO_ENCRYPTED,
    PUBOPTS_ANNOTATION,
    REF_NAME_ANNOTATION,
)

MAX_DEPTH = 8
ALREADY_WRAPPED = "already encrypted for "
MAX_DESCRIPTORS = 10_000  # listed by the distinct indexes and manifests of one image
WRAP_SCHEMES = ("jwe", "pkcs7")
# recipient prefixes skopeo knows that this version does not wrap for yet
LATER_SCHEMES = {"pgp": "PGP", "pkcs11": "PKCS#11", "provider": "key-provider"}
_RECIPIENT_FORMS = "jwe:PUBLIC-KEY-FILE or pkcs7:CERTIFICATE-FILE"


class Reporter(Protocol):
    """What the pipeline tells the person running it."""

    def start(self, label: str, total: int) -> Callable[[int], None] | None:
        """Begin a long step over `total` bytes; return a callback for the bytes done."""

    def finish(self) -> None:
        """The long step is over."""

    def say(self, text: str) -> None:
        """A line of the result (stdout)."""

    def warn(self, text: str) -> None:
        """A warning (stderr)."""


# --- recipients, keys and platforms ---------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """Someone to wrap the layer key for: a scheme and a public key (jwe) or certificate."""

    scheme: str
    source: str
    key: Any
    description: str


def _read_small_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(keys.MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyLoadError(f"{what} {path} cannot be read: {e.strerror}") from e
    if len(data) > keys.MAX_KEY_FILE_BYTES:
        raise KeyLoadError(f"{what} {path} is larger than 1 MiB, too large to be a key")
    return data


def parse_recipient(spec: str) -> Recipient:
    """Read `jwe:FILE` (RSA/EC public key as PEM, DER or JWK, or a certificate) or
    `pkcs7:CERT` (an x509 certificate with an RSA key)."""
    scheme, colon, path = spec.partition(":")
    if not colon or not scheme:
        raise UsageError(f"recipient {spec!r} names no scheme: use {_RECIPIENT_FORMS}")
    if scheme in LATER_SCHEMES:
        raise UsageError(
            f"{LATER_SCHEMES[scheme]} recipients ({scheme}:) are not supported by this version; "
            f"use {_RECIPIENT_FORMS}"
        )
    if scheme not in WRAP_SCHEMES:
        raise UsageError(
            f"unknown recipient type {scheme + ':'!r} in {spec!r}: use {_RECIPIENT_FORMS}"
        )
    if not path:
        raise UsageError(f"recipient {spec!r} names no file")
    data = _read_small_file(path, "recipient key")
    from cryptography.exceptions import UnsupportedAlgorithm

    if scheme == "jwe":
        key = keys.load_public_key(data, path)
        kind = jwe.public_jwk(key)
        name = f"RSA {key.key_size}" if kind["kty"] == "RSA" else f"EC {kind['crv']}"
        return Recipient(scheme, path, key, f"{name} kid {jwe.thumbprint(key)}")
    from cryptography.hazmat.primitives.asymmetric import rsa

    certificate = keys.load_certificate(data, path)
    try:
        public_key = certificate.public_key()
    except UnsupportedAlgorithm as e:
        raise KeyLoadError(
            f"{path}: the certificate's key is of a type this version cannot use ({e}); a "
            "pkcs7 recipient's certificate must hold an RSA key"
        ) from e
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise KeyLoadError(f"{path}: a pkcs7 recipient's certificate must hold an RSA key")
    subject = certificate.subject.rfc4514_string() or "(empty subject)"
    return Recipient(scheme, path, certificate, f"{subject} serial {certificate.serial_number}")


def recipient_identity(recipient: Recipient) -> str:
    """What tells two recipients apart: the RFC 7638 thumbprint of a JWE recipient's key
    (the `kid` we write), the SHA-256 fingerprint of a PKCS7 recipient's certificate."""
    if recipient.scheme == "jwe":
        return "jwe:" + jwe.thumbprint(recipient.key)
    from cryptography.hazmat.primitives import hashes

    fingerprint: bytes = recipient.key.fingerprint(hashes.SHA256())
    return "pkcs7:" + fingerprint.hex()


def parse_recipients(specs: list[str], reporter: Reporter | None = None) -> tuple[Recipient, ...]:
    """parse_recipient for each SPEC; a recipient given twice (the same key under two file
    names too) is kept once."""
    kept: dict[str, Recipient] = {}
    for spec in specs:
        recipient = parse_recipient(spec)
        identity = recipient_identity(recipient)
        if identity in kept:
            if reporter is not None:
                reporter.warn(f"{spec} is the same recipient as "
                              f"{kept[identity].scheme}:{kept[identity].source}; taken once")
            continue
        kept[identity] = recipient
    return tuple(kept.values())


# A JWE's per-recipient headers, kids included, are not authenticated: anyone who can change
# the manifest can change them. Our JWEs carry, in their protected header, an HMAC of their
# recipients (headers and wrapped keys) under a key derived from the layer's symmetric key,
# so whoever can open the layer can tell the recipients we wrote from altered ones; only
# holders of the layer key (its recipients) can make one.
KIDS_MAC_HEADER = "urn:pyimgcrypt:kids-hmac"
_KIDS_MAC_INFO = b"pyimgcrypt: the kids of one JWE's recipients, v1"


def kids_mac(symkey: bytes, binding: bytes) -> str:
    """base64url HMAC-SHA256 of a JWE's recipients (jwe.recipients_binding)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as crypto_hmac
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(hashes.SHA256(), 32, salt=None, info=_KIDS_MAC_INFO).derive(symkey)
    mac = crypto_hmac.HMAC(key, hashes.SHA256())
    mac.update(binding)
    return base64.urlsafe_b64encode(mac.finalize()).rstrip(b"=").decode("ascii")


def verified_kids(annotations: dict[str, str], symkey: bytes) -> set[str]:
    """The kids of the layer's JWEs whose kids-HMAC checks out under the layer's key."""
    value = keywrap.wrapped_keys(annotations).get("jwe")
    if not value:
        return set()
    try:
        blobs = keywrap.decode_blobs("jwe", value)
    except DecoderError:
        return set()
    verified: set[str] = set()
    for blob in blobs:
        try:
            parsed = jwe.parse(blob)
        except jwe.JWEFormatError:
            continue
        if kids_check_out(parsed, symkey):
            verified.update(str(r.header["kid"]) for r in parsed.recipients)
    return verified


def kids_check_out(parsed: jwe.JWE, symkey: bytes) -> bool:
    """Whether one JWE's recipients (headers, kids included, and wrapped keys) are those its
    kids-HMAC was made over (and it has one)."""
    import hmac

    claimed = parsed.recipients[0].header.get(KIDS_MAC_HEADER)
    if not isinstance(claimed, str) or not claimed.isascii():
        return False
    binding = jwe.recipients_binding(parsed.recipients, exclude=KIDS_MAC_HEADER)
    return hmac.compare_digest(claimed, kids_mac(symkey, binding))


def already_wrapped_for(annotations: dict[str, str], recipient: Recipient) -> bool:
    """Whether the layer's keys annotation of the recipient's scheme names it already: a JWE
    recipient by its `kid` (JWEs without kids, as skopeo writes, cannot tell; a claim until
    verified_kids confirms it), a PKCS7 one by its certificate's issuer and serial."""
    value = keywrap.wrapped_keys(annotations).get(recipient.scheme)
    if not value:
        return False
    try:
        blobs = keywrap.decode_blobs(recipient.scheme, value)
    except DecoderError:
        return False
    if recipient.scheme != "jwe":
        return bool(_pkcs7().names_certificate(blobs, recipient.key))
    kid = jwe.thumbprint(recipient.key)
    for blob in blobs:
        try:
            parsed = jwe.parse(blob)
        except jwe.JWEFormatError:
            continue
        if any(r.header.get("kid") == kid for r in parsed.recipients):
            return True
    return False


def _pkcs7() -> ModuleType:
    try:
        return importlib.import_module("decoder.keywrap.pkcs7")
    except ModuleNotFoundError as e:
        if e.name != "decoder.keywrap.pkcs7":
            raise
        raise UsageError("pkcs7 recipients need decoder.keywrap.pkcs7, missing here") from e


def wrap_annotations(private_options: bytes, recipients: list[Recipient]) -> dict[str, str]:
    """One wrapped blob per scheme for all of its recipients, as keys annotations."""
    annotations = {}
    for scheme in WRAP_SCHEMES:
        group = [r for r in recipients if r.scheme == scheme]
        if not group:
            continue
        if scheme == "jwe":
            symkey = layercipher.parse_private_options(private_options).symkey

            def kids_header(binding: bytes, key: bytes = symkey) -> dict[str, str]:
                return {KIDS_MAC_HEADER: kids_mac(key, binding)}

            blob = jwe.wrap(private_options, [(r.key, None) for r in group], kids_header)
        else:
            blob = _pkcs7().wrap(private_options, [r.key for r in group])
        annotations[KEYS_ANNOTATION_PREFIX + scheme] = base64.b64encode(blob).decode("ascii")
    return annotations


def parse_key_argument(text: str) -> tuple[str, bytes | None]:
    """KEY[:PASSWORD], where PASSWORD may also be pass=TEXT, file=PATH or fd=N (as ocicrypt's
    command lines take it). A KEY path that exists as written is taken whole."""
    import os

    if os.path.exists(text) or ":" not in text:
        return text, None
    path, _, secret = text.partition(":")
    if secret.startswith("pass="):
        return path, secret[len("pass=") :].encode()
    if secret == "file=":  # noqa: S105 (the option's form, not a password)
        raise UsageError(f"--key {path}:file= names no password file")
    if secret.startswith("file="):
        return path, keys.strip_newline(_read_small_file(secret[len("file=") :], "password file"))
    if secret.startswith("fd="):
        return path, keys.strip_newline(_read_password_fd(path, secret))
    return path, secret.encode()


MAX_PASSWORD_BYTES = 4096


def _read_password_fd(path: str, secret: str) -> bytes:
    """fd=N up to its first newline or its end, however a pipe splits it; at most 4 KiB."""
    import os

    data = b""
    try:
        fd = int(secret[len("fd=") :])
        if os.isatty(fd):
            raise UsageError(f"--key {path}:{secret} is a terminal, where the password would "
                             "show as it is typed; use file=PATH, or pipe it in")
        # a byte at a time: what follows the newline stays for whoever reads the fd next
        while not data.endswith(b"\n") and (byte := os.read(fd, 1)):
            data += byte
            if len(data) > MAX_PASSWORD_BYTES + 1:
                raise UsageError(f"--key {path}: the password on {secret} is over "
                                 f"{MAX_PASSWORD_BYTES} bytes")
    except (ValueError, OverflowError) as e:
        raise UsageError(
            f"--key {path}:{secret}: N must be the number of an open file descriptor"
        ) from e
    except OSError as e:
        raise UsageError(
            f"--key {path}: cannot read its password from {secret}: {e.strerror}"
        ) from e
    return data


def load_keys(arguments: list[str]) -> keys.KeyRing:
    """The --key files: each must hold a usable private key or certificate."""
    import os

    ring = keys.KeyRing()
    password_files: dict[str, str] = {}
    for argument in arguments:
        path, password = parse_key_argument(argument)
        data = _read_small_file(path, "key file")
        candidates: list[tuple[bytes | None, str]] = [(password, "")]
        if password is None:  # as in the decoder's key directories: beside the link or the key
            beside = dict.fromkeys(p + keys.PASSWORD_SUFFIX for p in (path, os.path.realpath(path)))
            candidates = [(keys.strip_newline(_read_small_file(c, "password file")), c)
                          for c in beside if os.path.isfile(c)]
        used = keys.classify_trying(data, candidates, path, ring)
        if candidates and candidates[0][1]:
            password_files[path] = used or candidates[0][1]
    if ring.skipped:
        source, reason = ring.skipped[0]
        hint = ""
        if reason == keys.WRONG_PASSWORD and source in password_files:
            hint = f" (from {password_files[source]})"
        elif "public" in reason:
            hint = (" (a public key names recipients: encrypt --recipient jwe:FILE, layerinfo "
                    "--recipient jwe:FILE)")
        elif reason == keys.NO_PASSWORD:
            hint = (f" (give it as --key {source}:file=PASSWORD-FILE, or put it in "
                    f"{source}{keys.PASSWORD_SUFFIX})")
        raise KeyLoadError(f"--key {source}: {reason}{hint}")
    return ring


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: Platform | None) -> bool:
        return (
            other is not None
            and (self.os, self.architecture) == (other.os, other.architecture)
            and (self.variant is None or self.variant == other.variant)
        )


_ARCHITECTURE_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"platform {text!r} is not OS/ARCH[/VARIANT] (for example linux/amd64)")
    architecture = _ARCHITECTURE_ALIASES.get(parts[1], parts[1])
    return Platform(parts[0], architecture, parts[2] if len(parts) == 3 else None)


def _platform_of(value: Any) -> Platform | None:
    if not isinstance(value, dict):
        return None
    os_name, architecture = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str):
        return None
    variant = value.get("variant")
    return Platform(os_name, architecture, variant if isinstance(variant, str) else None)


# --- the image tree -------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """What happens to one layer of one manifest."""

    index: int
    descriptor: dict[str, Any]
    action: str = "keep"  # keep | encrypt | add | decrypt
    reason: str = ""
    private_options: bytes = b""  # opened while planning (add, decrypt)
    recipients: tuple[Recipient, ...] = ()  # add: those the layer is not yet wrapped for


@dataclass
class Node:
    """An index, a manifest, or another blob an index refers to, as read from SRC."""

    descriptor: dict[str, Any]
    kind: str  # index | manifest | other
    raw: bytes = b""
    body: dict[str, Any] = field(default_factory=dict)
    platform: Platform | None = None
    children: list[Node] = field(default_factory=list)
    layers: list[LayerPlan] = field(default_factory=list)
    selected: bool = True

    @property
    def label(self) -> str:
        return str(self.platform) if self.platform else "the image"

    def manifests(self) -> Iterator[Node]:
        """The distinct manifests below (a manifest listed again is the same Node)."""
        seen: set[int] = set()

        def walk(node: Node) -> Iterator[Node]:
            if id(node) in seen:
                return
            seen.add(id(node))
            if node.kind == "manifest":
                yield node
            for child in node.children:
                yield from walk(child)

        return walk(self)


def _kind(descriptor: dict[str, Any], body: Any) -> str:
    media_type = descriptor.get("mediaType")
    if media_type is None and isinstance(body, dict):
        media_type = body.get("mediaType")
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        return "index"
    if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        return "manifest"
    if isinstance(body, dict) and isinstance(body.get("manifests"), list):
        return "index"
    if isinstance(body, dict) and isinstance(body.get("layers"), list):
        return "manifest"
    return "other"


class _TreeReader:
    """Reads an image tree from SRC as a graph of distinct nodes: each JSON blob is read,
    verified and parsed once, and a descriptor listed again (the same manifest in several
    indexes, or many times in one) is the same Node, walked once. The descriptors of the
    distinct nodes (index entries, configs, layers) are counted against MAX_DESCRIPTORS, so
    the work and memory stay bounded by the distinct structure whatever the repeats."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.blobs: dict[tuple[str, int], tuple[bytes, Any]] = {}
        self.platforms: dict[tuple[str, int], Platform | None] = {}
        self.nodes: dict[bytes, Node] = {}
        self.walked = 0

    def count(self, n: int, what: str) -> None:
        self.walked += n
        if self.walked > MAX_DESCRIPTORS:
            raise LayoutError(
                f"{self.layout.where}: {what} takes the image past {MAX_DESCRIPTORS} "
                "descriptors (index entries, configs and layers); refused as malformed"
            )

    def json_blob(self, descriptor: dict[str, Any], what: str) -> tuple[bytes, Any]:
        key = ocilayout.check_descriptor(descriptor, what)
        if key not in self.blobs:
            self.blobs[key] = self.layout.read_json_blob(descriptor, what)
        return self.blobs[key]

    def config_platform(self, config: dict[str, Any], what: str) -> Platform | None:
        key = ocilayout.check_descriptor(config, what)
        if key not in self.platforms:
            _, body = self.json_blob(config, "an image config")
            self.platforms[key] = _platform_of(body)
        return self.platforms[key]

    def node(self, descriptor: dict[str, Any], what: str, depth: int = 0) -> Node:
        if depth > MAX_DEPTH:
            raise LayoutError(f"{self.layout.where}: indexes nested more than {MAX_DEPTH} deep")
        ocilayout.check_descriptor(descriptor, what)
        key = json.dumps(descriptor, sort_keys=True).encode()
        if key not in self.nodes:
            self.nodes[key] = self._read(descriptor, depth)
        return self.nodes[key]

    def _read(self, descriptor: dict[str, Any], depth: int) -> Node:
        media_type = descriptor.get("mediaType")
        if media_type and media_type not in (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                                             DOCKER_MANIFEST):
            return Node(descriptor, "other")
        raw, body = self.json_blob(descriptor, "a manifest or index")
        digest = descriptor["digest"]
        kind = _kind(descriptor, body)
        node = Node(descriptor, kind, raw, body if isinstance(body, dict) else {})
        if kind == "index":
            children = body.get("manifests") if isinstance(body, dict) else None
            if not isinstance(children, list):
                raise LayoutError(
                    f"{self.layout.where}: index {digest} is not an image index "
                    "(it has no manifests list)"
                )
            self.count(len(children), f"index {digest}")
            for i, child in enumerate(children):
                if not isinstance(child, dict):
                    raise LayoutError(
                        f"{self.layout.where}: index {digest} lists a non-object (entry {i})"
                    )
                node.children.append(self.node(child, f"entry {i} of index {digest}", depth + 1))
        elif kind == "manifest":
            layers = body.get("layers") if isinstance(body, dict) else None
            if not isinstance(layers, list):
                raise LayoutError(
                    f"{self.layout.where}: manifest {digest} is not an image manifest "
                    "(it has no layers list)"
                )
            self.count(1 + len(layers), f"manifest {digest}")
            config = body.get("config")
            what = f"the config of manifest {digest}"
            ocilayout.check_descriptor(config, what)
            for i, layer in enumerate(layers):
                ocilayout.check_descriptor(layer, f"layer {i} of manifest {digest}")
                node.layers.append(LayerPlan(i, layer))
            node.platform = _platform_of(descriptor.get("platform"))
            if node.platform is None and config.get("mediaType") in (OCI_CONFIG, DOCKER_CONFIG):
                node.platform = self.config_platform(config, what)
        return node


def load_tree(layout: Layout, descriptor: dict[str, Any]) -> Node:
    """Read an image from SRC: indexes and manifests (digest-verified), not the layers."""
    return _TreeReader(layout).node(descriptor, f"the {ocilayout.INDEX_FILE} entry of the image")


def select(root: Node, platforms: list[Platform], layers: list[int], source: Location) -> None:
    """Mark the manifests the --platform options pick and check every --layer index."""
    manifests = list(root.manifests())
    if not manifests:
        raise LayoutError(f"{source} holds no image manifest")
    if platforms:
        for manifest in manifests:
            manifest.selected = any(p.matches(manifest.platform) for p in platforms)
        for platform in platforms:
            if not any(platform.matches(m.platform) for m in manifests):
                have = ", ".join(sorted({m.label for m in manifests}))
                raise UsageError(f"platform {platform} is not in {source} (it has {have})")
    for manifest in manifests:
        count = len(manifest.layers)
        for index in layers:
            if manifest.selected and not -count <= index < count:
                raise UsageError(
                    f"layer index {index} is out of range: {manifest.label} in {source} has "
                    f"{count} layer{'s' if count != 1 else ''} "
                    f"(0 to {count - 1}, or -1 to -{count})"
                )


def _layer_label(node: Node, plan: LayerPlan) -> str:
    return f"layer {plan.index} of {node.label} ({plan.descriptor['digest']})"


def _open_options(plan: LayerPlan, label: str, ring: keys.KeyRing) -> bytes:
    """Unwrap and check a layer's private options with the --key ring."""
    annotations = plan.descriptor.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise LayoutError(f"{label} has annotations that are not an object")
    public = layercipher.parse_public_options(annotations)
    # the unwrap error reads "no key opens layer <label>"
    private_json = keywrap.unwrap_private_options(annotations, ring, label.removeprefix("layer "))
    private = layercipher.parse_private_options(private_json)
    _check_plaintext_digest(private.digest, label)
    layercipher.cipher_parameters(private, public)
    return private_json


# the plaintext digests ocicrypt's options may carry (go-digest's), and those a layout can
# store a blob under; a digest algorithm's name, as the OCI digest grammar spells it
_PLAINTEXT_DIGESTS = {"sha256": 64, "sha384": 96, "sha512": 128}
_LAYOUT_DIGESTS = ("sha256", "sha512")
_ALGORITHM_NAME = re.compile(r"[a-z0-9]{1,16}(?:[+._-][a-z0-9]{1,16}){0,3}")
_HEX = re.compile(r"[0-9a-fA-F]+")


def _check_plaintext_digest(digest: str, label: str) -> None:
    """Refuse a missing or malformed plaintext digest in a layer's (unwrapped) private
    options without showing it: it is part of the confidential options, and a malformed one
    may be anything. Only its algorithm, when it has the form of one, is named."""
    algorithm, colon, hex_digest = digest.partition(":")
    if not digest:
        raise LayerOptionsError(f"{label}: its private options carry no plaintext digest")
    if not colon or algorithm not in _PLAINTEXT_DIGESTS:
        named = (f"the unknown algorithm {algorithm!r}" if colon and
                 _ALGORITHM_NAME.fullmatch(algorithm) else "a malformed digest")
        raise LayerOptionsError(
            f"{label}: its private options give the plaintext digest in {named} (ocicrypt "
            f"knows {', '.join(_PLAINTEXT_DIGESTS)})"
        )
    if len(hex_digest) != _PLAINTEXT_DIGESTS[algorithm] or not _HEX.fullmatch(hex_digest):
        raise LayerOptionsError(
            f"{label}: the {algorithm} plaintext digest in its private options is malformed"
        )


def _check_storable(private_json: bytes, label: str) -> None:
    """Decrypting stores the layer under its plaintext digest: that must be one a layout
    addresses blobs by. The digest itself is never shown."""
    algorithm = layercipher.parse_private_options(private_json).digest.partition(":")[0]
    if algorithm not in _LAYOUT_DIGESTS:
        raise LayerOptionsError(
            f"{label} cannot be decrypted into an OCI layout: its private options give the "
            f"plaintext digest in {algorithm}, and a layout addresses blobs by "
            f"{' or '.join(_LAYOUT_DIGESTS)} only (ctd-decoder still decrypts it when "
            "containerd pulls it); nothing was written"
        )


@dataclass(frozen=True)
class Request:
    """An encrypt or decrypt run, as the command line gives it."""

    command: str  # encrypt | decrypt
    source: Location
    destination: Location
    recipients: tuple[Recipient, ...] = ()
    ring: keys.KeyRing = field(default_factory=keys.KeyRing)
    layers: tuple[int, ...] = ()
    platforms: tuple[Platform, ...] = ()
    accept_digest_mismatch: bool = False


def plan(request: Request, root: Node) -> int:
    """Decide every selected layer's action; unwrap what must be opened. Returns how many
    layers change."""
    opened: dict[str, bytes] = {}
    changes = 0
    for node in root.manifests():
        if not node.selected:
            continue
        count = len(node.layers)
        wanted = {i % count for i in request.layers} if request.layers else set(range(count))
        for layer in node.layers:
            if layer.index not in wanted:
                continue
            media_type = layer.descriptor.get("mediaType")
            label = _layer_label(node, layer)
            encrypted = media_type in ENCRYPTED_TO_PLAIN
            if request.command == "decrypt":
                layer.action = "decrypt" if encrypted else "keep"
                layer.reason = "" if encrypted else "not encrypted"
            elif encrypted:
                annotations = layer.descriptor.get("annotations") or {}
                annotations = annotations if isinstance(annotations, dict) else {}
                claimed = [r for r in request.recipients if already_wrapped_for(annotations, r)]
                checked = ""
                if any(r.scheme == "jwe" for r in claimed):
                    if request.ring.private_keys:  # a kid is a claim until the layer's key says
                        digest = str(layer.descriptor["digest"])
                        if digest not in opened:
                            opened[digest] = _open_with_context(request, layer, label)
                        symkey = layercipher.parse_private_options(opened[digest]).symkey
                        verified = verified_kids(annotations, symkey)
                        claimed = [r for r in claimed
                                   if r.scheme != "jwe" or jwe.thumbprint(r.key) in verified]
                    else:
                        checked = " (as its JWE's kids claim; give --key to check them)"
                layer.recipients = tuple(r for r in request.recipients if r not in claimed)
                if layer.recipients:
                    layer.action = "add"
                else:
                    layer.reason = (ALREADY_WRAPPED + _recipient_summary(list(request.recipients))
                                    + checked)
            elif media_type in PLAIN_TO_ENCRYPTED:
                layer.action = "encrypt"
                if not str(layer.descriptor["digest"]).startswith("sha256:"):
                    raise LayoutError(f"{label}: only layers with sha256 digests can be encrypted")
            else:
                layer.reason = "foreign layer" if media_type in FOREIGN_LAYERS else (
                    f"media type {media_type} is not a tar, tar+gzip or tar+zstd layer")
            if layer.action in ("add", "decrypt"):
                digest = str(layer.descriptor["digest"])
                if digest not in opened:
                    opened[digest] = _open_with_context(request, layer, label)
                layer.private_options = opened[digest]
                if layer.action == "decrypt":
                    _check_storable(layer.private_options, label)
            changes += layer.action != "keep"
    if request.command == "encrypt":
        _refuse_plain_copies(root)
    return changes


def _refuse_plain_copies(root: Node) -> None:
    """A blob this run encrypts must not stay in plain elsewhere in the image it writes (a
    layer listed twice in a manifest, or shared with a platform left out): the registry would
    get its plaintext after all."""
    encrypted: dict[str, str] = {}
    for node in root.manifests():
        for layer in node.layers:
            if layer.action == "encrypt":
                encrypted.setdefault(str(layer.descriptor["digest"]), _layer_label(node, layer))
    if not encrypted:
        return
    for node in root.manifests():
        for layer in node.layers:
            first = encrypted.get(str(layer.descriptor["digest"]))
            if layer.action != "keep" or first is None:
                continue
            if not node.selected:
                left_out, fix = ("its platform is not among the --platform options",
                                 "select that layer too, or leave out --layer/--platform")
            elif layer.reason:
                left_out, fix = (f"{layer.reason}, which is never encrypted",
                                 "leave this layer out with --layer")
            else:
                left_out, fix = ("its index is not among the --layer options",
                                 "select that layer too, or leave out --layer/--platform")
            raise UsageError(
                f"{first} is also layer {layer.index} of {node.label}, which this run would "
                f"leave in plain ({left_out}), so the image written would still carry the "
                f"layer unencrypted; {fix}"
            )
    for digest, where in _blobs_copied_as_they_are(root):
        if digest in encrypted:
            raise UsageError(
                f"{encrypted[digest]} is also {where}, which is copied as it is, so the image "
                "written would still carry the layer unencrypted; leave this layer out with "
                "--layer"
            )


def _blobs_copied_as_they_are(root: Node) -> Iterator[tuple[str, str]]:
    """(digest, what it is) of the configs and non-manifest index entries of the image."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.kind == "other":
            yield str(node.descriptor.get("digest")), (
                f"an index entry of type {node.descriptor.get('mediaType')}")
        elif node.kind == "manifest" and isinstance(node.body.get("config"), dict):
            yield str(node.body["config"].get("digest")), f"the config of {node.label}"
        todo.extend(node.children)


def _open_with_context(request: Request, layer: LayerPlan, label: str) -> bytes:
    if request.command == "encrypt" and not request.ring.private_keys:
        raise NoMatchingKeyError(
            f"{label} is already encrypted: adding recipients keeps its ciphertext and needs "
            "--key with a private key that opens it"
        )
    if request.command == "decrypt" and not request.ring.private_keys:
        raise NoMatchingKeyError(f"{label} is encrypted and no --key was given to open it")
    try:
        return _open_options(layer, label, request.ring)
    except NoMatchingKeyError as e:
        if request.command == "encrypt":
            raise NoMatchingKeyError(f"cannot add recipients to an encrypted layer: {e}") from e
        raise


# --- writing --------------------------------------------------------------------------------


def _without_encryption_annotations(descriptor: dict[str, Any]) -> dict[str, Any]:
    """A copy for a new blob: no encryption annotations and no embedded `data` (OCI 1.1)."""
    result = {k: v for k, v in descriptor.items() if k != "data"}
    annotations = {
        k: v for k, v in (descriptor.get("annotations") or {}).items()
        if not k.startswith(ANNOTATION_PREFIX)
    }
    result.pop("annotations", None)
    if annotations:
        result["annotations"] = annotations
    return result


class Writer:
    """Writes the new image into DST, reusing the work for a layer shared by manifests."""

    def __init__(
        self, request: Request, layout: Layout, destination: ocilayout.Destination,
        reporter: Reporter,
    ) -> None:
        self.request = request
        self.layout = layout
        self.destination = destination
        self.reporter = reporter
        self.done: dict[tuple[str, str], dict[str, Any]] = {}
        self.written: dict[int, dict[str, Any]] = {}  # id(node) -> its new descriptor

    def node(self, node: Node) -> dict[str, Any]:
        """Write a node and everything below it, once however often it is listed; return its
        (possibly new) descriptor."""
        if id(node) not in self.written:
            self.written[id(node)] = self._node(node)
        return self.written[id(node)]

    def _node(self, node: Node) -> dict[str, Any]:
        if node.kind == "other":
            self.destination.copy_blob(self.layout, node.descriptor, "a blob")
            return node.descriptor
        if node.kind == "index":
            children = [self.node(child) for child in node.children]
            if children == [child.descriptor for child in node.children]:
                return self._unchanged(node)
            body = dict(node.body)
            if body.get("mediaType") == DOCKER_MANIFEST_LIST:
                body["mediaType"] = OCI_INDEX
            body["manifests"] = children
            return self._rewritten(node, body, OCI_INDEX)
        self.destination.copy_blob(self.layout, node.body["config"], "an image config")
        layers = [self.layer(node, plan) for plan in node.layers]
        if all(plan.action == "keep" for plan in node.layers):
            return self._unchanged(node)
        body = dict(node.body)
        if node.descriptor.get("mediaType") == DOCKER_MANIFEST or body.get("mediaType") == (
            DOCKER_MANIFEST
        ):
            layers = [_docker_to_oci(layer) for layer in layers]
            body["config"] = _docker_to_oci(body["config"])
        body["mediaType"] = OCI_MANIFEST
        body["layers"] = layers
        return self._rewritten(node, body, OCI_MANIFEST)

    def _unchanged(self, node: Node) -> dict[str, Any]:
        if not self.destination.has_blob(str(node.descriptor["digest"])):
            with self.destination.blob_sink() as sink:
                layercipher.write_all(sink.fd, memoryview(node.raw), str(self.request.destination))
                sink.commit(str(node.descriptor["digest"]), len(node.raw))
        return node.descriptor

    def _rewritten(self, node: Node, body: dict[str, Any], media_type: str) -> dict[str, Any]:
        data = ocilayout.json_bytes(body)
        descriptor = dict(node.descriptor)
        descriptor.update(
            mediaType=media_type, digest=self.destination.put_bytes(data), size=len(data)
        )
        return descriptor

    def layer(self, node: Node, plan: LayerPlan) -> dict[str, Any]:
        # one piece of work per distinct descriptor, when manifests share a layer
        key = (ocilayout.json_bytes(plan.descriptor).decode(), plan.action)
        if key not in self.done:
            if plan.action == "keep":
                self.destination.copy_blob(self.layout, plan.descriptor, "a layer")
                self.done[key] = plan.descriptor
            else:
                self.done[key] = getattr(self, f"_{plan.action}")(node, plan)
        return self.done[key]

    def _progress(self, verb: str, node: Node, plan: LayerPlan) -> Callable[[int], None] | None:
        size = int(plan.descriptor["size"])
        return self.reporter.start(f"{verb} layer {plan.index} of {node.label}", size)

    def _encrypt(self, node: Node, plan: LayerPlan) -> dict[str, Any]:
        digest = str(plan.descriptor["digest"])
        with self.layout.open_blob(plan.descriptor, "a layer") as blob, \
                self.destination.blob_sink() as sink:
            try:
                encrypted = layercipher.encrypt_stream(
                    blob.fd, sink.fd, digest, blob.size, self._progress("encrypting", node, plan),
                    f"the encrypted layer into {self.request.destination}",
                )
            finally:
                self.reporter.finish()
            sink.commit(encrypted.ciphertext_digest, encrypted.size)
        recipients = list(self.request.recipients)
        descriptor = _without_encryption_annotations(plan.descriptor)
        annotations = dict(descriptor.get("annotations") or {})
        annotations.update(wrap_annotations(encrypted.private_options, recipients))
        annotations[PUBOPTS_ANNOTATION] = base64.b64encode(encrypted.public_options).decode()
        descriptor.update(
            mediaType=PLAIN_TO_ENCRYPTED[str(plan.descriptor["mediaType"])],
            digest=encrypted.ciphertext_digest,
            size=encrypted.size,
            annotations=annotations,
        )
        self.reporter.say(
            f"{node.label} layer {plan.index}: {digest} encrypted as "
            f"{encrypted.ciphertext_digest} for {_recipient_summary(recipients)}"
        )
        return descriptor

    def _add(self, node: Node, plan: LayerPlan) -> dict[str, Any]:
        self.destination.copy_blob(self.layout, plan.descriptor, "a layer",
                                   self._progress("copying", node, plan))
        self.reporter.finish()
        descriptor = dict(plan.descriptor)
        annotations = dict(descriptor.get("annotations") or {})
        recipients = list(plan.recipients)
        for name, value in wrap_annotations(plan.private_options, recipients).items():
            annotations[name] = f"{annotations[name]},{value}" if annotations.get(name) else value
        descriptor["annotations"] = annotations
        present = [r for r in self.request.recipients if r not in plan.recipients]
        self.reporter.say(
            f"{node.label} layer {plan.index}: {plan.descriptor['digest']} already encrypted; "
            f"added {_recipient_summary(recipients)} (same ciphertext)"
            + (f"; already a recipient: {_recipient_summary(present)}" if present else "")
        )
        return descriptor

    def _decrypt(self, node: Node, plan: LayerPlan) -> dict[str, Any]:
        label = _layer_label(node, plan)
        annotations = plan.descriptor.get("annotations") or {}
        params = layercipher.cipher_parameters(
            layercipher.parse_private_options(plan.private_options),
            layercipher.parse_public_options(annotations),
        )
        with self.layout.open_blob(plan.descriptor, "a layer") as blob, \
                self.destination.blob_sink() as sink:
            try:
                decryptor = _decrypt_blob(params, blob, sink.fd,
                                          self._progress("decrypting", node, plan),
                                          f"the decrypted layer into {self.request.destination}")
            finally:
                self.reporter.finish()
            try:
                warning = decryptor.verify(accept_digest_mismatch=True)
            except IntegrityError as e:
                raise IntegrityError(
                    f"{label} failed its HMAC check: the ciphertext was altered or is not "
                    "the one its options were made for; nothing was written"
                ) from e
            if warning is not None:
                if not self.request.accept_digest_mismatch:
                    raise IntegrityError(
                        f"{label} decrypts to content that does not match the digest in its "
                        "private options, though its HMAC verified: skopeo records the source "
                        "blob's digest when it recompresses a layer while encrypting. Add "
                        "--accept-digest-mismatch to keep the layer under its real digest; "
                        "nothing was written"
                    )
                self.reporter.warn(
                    f"{label}: decrypted content does not match the digest in its private "
                    f"options; kept as {decryptor.plaintext_digest} (--accept-digest-mismatch)"
                )
            plaintext_digest = decryptor.plaintext_digest
            sink.commit(plaintext_digest, blob.size)
        descriptor = _without_encryption_annotations(plan.descriptor)
        descriptor.update(
            mediaType=ENCRYPTED_TO_PLAIN[str(plan.descriptor["mediaType"])],
            digest=plaintext_digest,
            size=blob.size,
        )
        self.reporter.say(
            f"{node.label} layer {plan.index}: {plan.descriptor['digest']} decrypted to "
            f"{plaintext_digest}"
        )
        return descriptor


def _decrypt_blob(
    params: layercipher.CipherParameters, blob: ocilayout.Blob, out_fd: int,
    progress: Callable[[int], None] | None, output_name: str = "the decrypted layer",
) -> layercipher.LayerDecryptor:
    """Decrypt a whole blob to out_fd, checking the ciphertext against its digest; the caller
    verifies HMAC and plaintext digest before committing what was written."""
    decryptor = layercipher.LayerDecryptor(params)
    algorithm = blob.digest.partition(":")[0]
    ciphertext_digest = hashlib.new(algorithm)
    # Three hashes per byte: this thread reads, digests the ciphertext, decrypts and writes;
    # the second MACs the ciphertext and digests the plaintext of the chunk before.
    hasher = layercipher.SecondThread()
    try:
        for ciphertext, out_view in layercipher.slotted_chunks(hasher, blob.fd, blob.size):
            ciphertext_digest.update(ciphertext)
            n = decryptor.update_into(ciphertext, out_view, hasher)
            layercipher.write_all(out_fd, out_view[:n], output_name)
            if progress is not None:
                progress(decryptor.bytes_processed)
    except BaseException:
        hasher.abandon()
        raise
    hasher.finish()
    if decryptor.bytes_processed != blob.size:
        raise LayoutError(f"layer {blob.digest} ended early, after {decryptor.bytes_processed} "
                          f"of its {blob.size} bytes")
    if f"{algorithm}:{ciphertext_digest.hexdigest()}" != blob.digest:
        raise LayoutError(f"layer {blob.digest} is corrupt: its content has another digest")
    return decryptor


def _docker_to_oci(descriptor: dict[str, Any]) -> dict[str, Any]:
    media_type = descriptor.get("mediaType")
    if media_type not in DOCKER_TO_OCI:
        return descriptor
    return {**descriptor, "mediaType": DOCKER_TO_OCI[str(media_type)]}


def _recipient_summary(recipients: list[Recipient]) -> str:
    return ", ".join(f"{r.scheme}:{r.source}" for r in recipients)


def _same_place(a: Location, b: Location) -> bool:
    import os

    return a.transport == b.transport and os.path.realpath(a.path) == os.path.realpath(b.path)


class _HeldResults:
    """A Reporter whose result lines are kept for later; progress and warnings go through."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.lines: list[str] = []

    def start(self, label: str, total: int) -> Callable[[int], None] | None:
        return self.reporter.start(label, total)

    def finish(self) -> None:
        self.reporter.finish()

    def say(self, text: str) -> None:
        self.lines.append(text)

    def warn(self, text: str) -> None:
        self.reporter.warn(text)


def run(request: Request, reporter: Reporter) -> str:
    """Encrypt or decrypt SRC into DST; return the new image's digest."""
    layout = Layout(request.source)
    entry = layout.find_image(request.source.ref)
    root = load_tree(layout, entry)
    select(root, list(request.platforms), list(request.layers), request.source)
    changes = plan(request, root)
    # Layers that already have every recipient are kept as they are, and said so: asking
    # again for recipients an image has is not an error (a script can run twice).
    present = [(m, p) for m in root.manifests() if m.selected for p in m.layers
               if p.reason.startswith(ALREADY_WRAPPED)]
    if not changes and not present:
        kept = {p.reason for m in root.manifests() for p in m.layers
                if m.selected and p.reason and p.reason != "not encrypted"}
        what = "encrypted" if request.command == "decrypt" else "a layer that can be encrypted"
        raise UsageError(
            f"nothing to {request.command}: no selected layer of {request.source} is {what}"
            + (f" ({'; '.join(sorted(kept))})" if kept else "") + "; nothing was written"
        )
    ref = request.destination.ref or ocilayout.ref_name(entry)
    if _same_place(request.source, request.destination) and ref == ocilayout.ref_name(entry):
        raise UsageError(
            f"{request.destination} would replace the source image; give DST another REF"
        )
    # Result lines wait for the commit: a run that fails writes nothing, and says nothing
    # that would claim otherwise.
    results = _HeldResults(reporter)
    for node, layer in present:
        results.say(f"{node.label} layer {layer.index}: {layer.descriptor['digest']} "
                    f"{layer.reason}; unchanged")
    destination = ocilayout.open_destination(request.destination)
    try:
        new_entry = Writer(request, layout, destination, results).node(root)
        if ref is not None:
            new_entry["annotations"] = {**(new_entry.get("annotations") or {}),
                                        REF_NAME_ANNOTATION: ref}
        replaced = [e for e in (destination.existing_index or {}).get("manifests", [])
                    if isinstance(e, dict) and ref is not None and ocilayout.ref_name(e) == ref]
        destination.commit(ocilayout.merged_index(destination.existing_index, new_entry))
    except BaseException:
        destination.abort()
        raise
    for line in results.lines:
        reporter.say(line)
    where = Location(request.destination.transport, request.destination.path, ref)
    reporter.say(f"wrote {where} ({new_entry['digest']})"
                 + "".join(f"; it replaces the image {ref} was ({e.get('digest')})"
                           for e in replaced if e.get("digest") != new_entry["digest"]))
    return str(new_entry["digest"])


# --- layerinfo ------------------------------------------------------------------------------


def _recipients(
    annotations: dict[str, str], kids: dict[str, str], symkey: bytes | None = None
) -> list[dict[str, Any]]:
    """Who each keys annotation names, as far as its scheme says; with the layer's symkey,
    whether each JWE's kids are the ones it was made with."""
    found: list[dict[str, Any]] = []
    for scheme, value in keywrap.wrapped_keys(annotations).items():
        try:
            blobs = keywrap.decode_blobs(scheme, value)
        except DecoderError as e:
            found.append({"scheme": scheme, "description": str(e)})
            continue
        if scheme == "jwe":
            for blob in blobs:
                try:
                    parsed = jwe.parse(blob)
                except jwe.JWEFormatError:
                    found.append({"scheme": scheme, "description": "an unreadable JWE"})
                    continue
                checked = None if symkey is None else kids_check_out(parsed, symkey)
                for recipient in parsed.recipients:
                    found.append(_jwe_recipient(recipient.header, kids, checked))
        elif scheme in keywrap.SCHEMES:
            module: keywrap.Scheme = importlib.import_module(keywrap.SCHEMES[scheme])
            found.append({"scheme": scheme, "description": module.describe(blobs)})
        elif scheme in keywrap.NOT_YET_SUPPORTED:
            found.append({"scheme": scheme, "description": f"{len(blobs)} wrapped key(s) "
                          "(this version cannot read whom for)"})
        else:
            found.append({"scheme": scheme, "description": f"{len(blobs)} wrapped key(s)"})
    return found


def _jwe_recipient(
    header: dict[str, Any], kids: dict[str, str], checked: bool | None = None
) -> dict[str, Any]:
    """One JWE recipient as layerinfo shows it. `checked`: whether its JWE's kids passed the
    kids-HMAC (None: not checked, no --key opens the layer); a kid that failed names nobody."""
    entry: dict[str, Any] = {"scheme": "jwe", "alg": str(header.get("alg", "?"))}
    epk = header.get("epk")
    if isinstance(epk, dict) and "crv" in epk:
        entry["curve"] = str(epk["crv"])
    kid = header.get("kid")
    note = "(no kid)"
    if isinstance(kid, str):
        entry["kid"] = kid
        entry["kidVerified"] = checked
        if checked is False:
            note = "(kid altered: it fails its check, or is not ctd-encoder's)"
        elif kid in kids:
            entry["key"] = kids[kid]
            note = f"({entry['key']})" if checked else f"({entry['key']}, unchecked)"
        else:
            note = "" if checked else "(unchecked)"
    parts = [entry["alg"], entry.get("curve", ""), f"kid {kid}" if "kid" in entry else "", note]
    entry["description"] = " ".join(p for p in parts if p)
    return entry


def layer_descriptor(
    source: Location, platforms: list[Platform], index: int
) -> tuple[dict[str, Any], str, str]:
    """One layer's descriptor, its label, and where its blob is: (descriptor, label, blob)."""
    import os

    layout = Layout(source)
    root = load_tree(layout, layout.find_image(source.ref))
    select(root, platforms, [index], source)
    manifests = [m for m in root.manifests() if m.selected]
    if len(manifests) != 1:
        have = ", ".join(sorted(m.label for m in manifests))
        raise UsageError(f"{source} has several platforms ({have}); pick one with --platform")
    (manifest,) = manifests
    plan_ = manifest.layers[index % len(manifest.layers)]
    if plan_.descriptor.get("mediaType") not in ENCRYPTED_TO_PLAIN:
        raise UsageError(f"{_layer_label(manifest, plan_)} is not encrypted "
                         f"({plan_.descriptor.get('mediaType')}): ctd-decoder would refuse it")
    digest = str(plan_.descriptor["digest"])
    name = ocilayout.blob_name(digest)
    blob = (os.path.join(source.path, name) if source.transport == "oci"
            else f"{name} inside the archive {source.path}")
    return dict(plan_.descriptor), _layer_label(manifest, plan_), blob


def layer_info(
    source: Location, ring: keys.KeyRing, platforms: list[Platform],
    known: tuple[Recipient, ...] = (),
) -> dict[str, Any]:
    """Per platform and layer: digest, size, media type, schemes, recipients and, with
    keys, which of them open it (the wrapped options are unwrapped, the layer is not read).
    JWE recipients are named by the --key files and the `known` public keys their kid is
    the thumbprint of."""
    layout = Layout(source)
    entry = layout.find_image(source.ref)
    root = load_tree(layout, entry)
    select(root, platforms, [], source)
    kids = {jwe.thumbprint(r.key): r.source for r in known if r.scheme == "jwe"}
    kids.update({jwe.thumbprint(k.key.public_key()): k.source for k in ring.private_keys})
    manifests = []
    described: dict[bytes, dict[str, Any]] = {}  # a layer shared by manifests, done once
    for node in root.manifests():
        if not node.selected:
            continue
        layers = []
        for plan_ in node.layers:
            key = json.dumps(plan_.descriptor, sort_keys=True).encode()
            if key not in described:
                described[key] = _describe_layer(node, plan_, ring, kids)
            layers.append({"index": plan_.index, **described[key]})
        manifests.append({
            "platform": str(node.platform) if node.platform else None,
            "manifest": node.descriptor["digest"],
            "layers": layers,
        })
    return {"image": str(source), "digest": entry["digest"], "manifests": manifests}


def _describe_layer(
    node: Node, plan_: LayerPlan, ring: keys.KeyRing, kids: dict[str, str]
) -> dict[str, Any]:
    descriptor = plan_.descriptor
    annotations = descriptor.get("annotations") or {}
    media_type = str(descriptor.get("mediaType"))
    info: dict[str, Any] = {
        "digest": descriptor["digest"],
        "size": descriptor["size"],
        "mediaType": media_type,
        "encrypted": media_type in ENCRYPTED_TO_PLAIN,
        "schemes": list(keywrap.wrapped_keys(annotations)),
    }
    symkey = None
    if ring.private_keys and info["encrypted"]:
        info["openedBy"], symkey = _opened_by(plan_, _layer_label(node, plan_), ring)
    info["recipients"] = _recipients(annotations, kids, symkey)
    return info


def _opened_by(
    plan_: LayerPlan, label: str, ring: keys.KeyRing
) -> tuple[list[str], bytes | None]:
    """The --key files that open the layer, and its symmetric key if one did."""
    opened = []
    symkey = None
    for key in ring.private_keys:
        alone = keys.KeyRing(private_keys=[key], certificates=ring.certificates)
        try:
            private_json = _open_options(plan_, label, alone)
        except DecoderError:
            continue
        opened.append(key.source)
        symkey = layercipher.parse_private_options(private_json).symkey
    return opened, symkey

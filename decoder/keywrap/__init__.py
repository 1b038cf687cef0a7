"""Key-wrap schemes, keyed by the annotation they read, and the unwrap loop over them.

Every `org.opencontainers.image.enc.keys.<scheme>` annotation holds one or more
comma-joined standard-base64 blobs, each wrapping the same private-options JSON. The first
blob that any key opens wins. Scheme modules are imported only when a layer uses them.
"""

from __future__ import annotations

import binascii
import importlib
from typing import Protocol

from decoder.errors import LayerOptionsError, NoMatchingKeyError
from decoder.keys import KeyRing
from decoder.spec import KEYS_ANNOTATION_PREFIX


class Scheme(Protocol):
    def unwrap(self, blobs: list[bytes], ring: KeyRing, notes: list[str]) -> bytes | None:
        """The private-options JSON, or None when no key opens any blob (reasons in notes)."""

    def describe(self, blobs: list[bytes]) -> str:
        """Who the blobs are wrapped for, as far as the format says."""


# scheme name (annotation suffix) -> module implementing Scheme
SCHEMES: dict[str, str] = {"jwe": "decoder.keywrap.jwe", "pkcs7": "decoder.keywrap.pkcs7"}

# schemes ocicrypt defines that this version recognises but cannot unwrap yet
NOT_YET_SUPPORTED: dict[str, str] = {
    "pgp": "PGP",
    "pkcs11": "PKCS11",
}


def wrapped_keys(annotations: dict[str, str]) -> dict[str, str]:
    """Scheme name -> annotation value, for every non-empty keys annotation, sorted by name."""
    return {
        name[len(KEYS_ANNOTATION_PREFIX) :]: value
        for name, value in sorted(annotations.items())
        if name.startswith(KEYS_ANNOTATION_PREFIX) and value
    }


def decode_blobs(scheme: str, value: str) -> list[bytes]:
    blobs = []
    for index, part in enumerate(value.split(","), start=1):
        text = part.replace("\r", "").replace("\n", "").strip()  # Go's decoder skips newlines
        try:
            blobs.append(binascii.a2b_base64(text.encode("ascii"), strict_mode=True))
        except (binascii.Error, UnicodeEncodeError) as e:
            raise LayerOptionsError(
                f"wrapped key {index} in the {KEYS_ANNOTATION_PREFIX}{scheme} annotation "
                "is not valid base64"
            ) from e
    return blobs


def unwrap_private_options(annotations: dict[str, str], ring: KeyRing, layer: str) -> bytes:
    """Open the layer's private options with the first key that can, or explain why none can."""
    wrapped = wrapped_keys(annotations)
    if not wrapped:
        raise LayerOptionsError(
            f"layer {layer} has no wrapped keys (no {KEYS_ANNOTATION_PREFIX}* annotation); "
            "it was not encrypted with ocicrypt"
        )
    notes: list[str] = []
    wrapped_for: list[str] = []
    for scheme, value in wrapped.items():
        if scheme in SCHEMES:
            module: Scheme = importlib.import_module(SCHEMES[scheme])
            blobs = decode_blobs(scheme, value)
            if ring.private_keys:
                opened = module.unwrap(blobs, ring, notes)
                if opened is not None:
                    return opened
            wrapped_for.append(module.describe(blobs))
        elif scheme in NOT_YET_SUPPORTED:
            wrapped_for.append(f"{NOT_YET_SUPPORTED[scheme]} (not supported by this version)")
        elif scheme.startswith("provider."):
            wrapped_for.append(
                f"key provider {scheme[len('provider.') :]!r} "
                "(key providers are not supported by this version)"
            )
        else:
            wrapped_for.append(f"unknown scheme {scheme!r}")
    raise NoMatchingKeyError(_no_key_message(layer, ring, notes, wrapped_for))


def _no_key_message(layer: str, ring: KeyRing, notes: list[str], wrapped_for: list[str]) -> str:
    # The node's own facts come first; what the (untrusted) layer says comes last, so a
    # layer with a huge recipient list cannot push them out of a length-capped message.
    parts = [f"no key opens layer {layer}"]
    if ring.private_keys:
        tried = ", ".join(f"{k.source} ({k.description})" for k in ring.private_keys)
        parts.append(f"keys tried: {tried}")
    else:
        searched = (
            f"key directories {', '.join(ring.directories)}"
            if ring.directories
            else "no --decryption-keys-path was given"
        )
        payload = f"{ring.payload_keys} payload keys" if ring.payload_keys else "no payload keys"
        parts.append(f"no usable private key was found ({searched}; {payload})")
    if ring.skipped:
        skipped = ", ".join(f"{source} ({reason})" for source, reason in ring.skipped)
        parts.append(f"skipped: {skipped}")
    parts.append(f"the layer is wrapped for: {', '.join(wrapped_for)}")
    parts.extend(notes[:8])
    return "; ".join(parts)

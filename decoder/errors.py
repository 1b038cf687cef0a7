"""The one error hierarchy: every expected failure is a DecoderError; anything else is a bug."""

from __future__ import annotations


class DecoderError(Exception):
    """An expected failure, shown to the operator as one line on stderr (exit 1)."""


class UsageError(DecoderError):
    """Bad command-line arguments."""


class PayloadError(DecoderError):
    """The fd-3 payload is missing or malformed."""


class KeyLoadError(DecoderError):
    """A key could not be read or parsed."""


class NoMatchingKeyError(DecoderError):
    """No available key unwraps the layer key."""


class LayerOptionsError(DecoderError):
    """The layer's cipher options (annotations, wrapped private options) are unusable."""


class IntegrityError(DecoderError):
    """The ciphertext or the plaintext failed verification (HMAC or digest)."""


class OutputError(DecoderError):
    """Writing the plaintext failed (for example the reader closed the pipe)."""


class LayoutError(DecoderError):
    """An image layout or archive is missing, malformed, or does not hold what was asked for."""

"""The decoder pipeline, and the only module that knows its order:
payload (fd 3) -> media-type gate -> public options -> keys -> unwrap -> layer cipher -> stdout.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from decoder import keywrap, layercipher
from decoder.errors import LayerOptionsError
from decoder.keys import load_keyring
from decoder.payload import parse_payload, read_payload_fd
from decoder.spec import ENCRYPTED_TO_PLAIN, MEDIA_TYPE_ENV


class Options(NamedTuple):
    """What the command line says."""

    key_directories: list[str]
    keyprovider_config: str | None = None
    accept_digest_mismatch: bool = False
    spool_directory: str | None = None


def check_media_type(media_type: str, passed: str | None = None) -> None:
    """Refuse a descriptor type we cannot decrypt; `passed` is containerd's own view of the
    type (STREAM_PROCESSOR_MEDIATYPE), named in the error when it differs."""
    if media_type not in ENCRYPTED_TO_PLAIN:
        shown = media_type or "(none)"
        differs = ""
        if passed and passed != media_type:
            differs = f" (containerd passed {MEDIA_TYPE_ENV}={passed})"
        raise LayerOptionsError(
            f"layer media type {shown} is not an encrypted layer type this decoder handles"
            f"{differs}; expected an OCI or Docker tar, tar+gzip or tar+zstd type ending in "
            "+encrypted"
        )


def run(options: Options, in_fd: int = 0, out_fd: int = 1) -> list[str]:
    """Decrypt one layer from in_fd to out_fd. Returns warnings for stderr."""
    payload = parse_payload(read_payload_fd())
    descriptor = payload.descriptor
    check_media_type(descriptor.media_type, os.environ.get(MEDIA_TYPE_ENV))
    public = layercipher.parse_public_options(descriptor.annotations)
    layercipher.check_public_options(public)
    ring = load_keyring(options.key_directories, payload.parameters)
    layer = _shown_digest(descriptor.digest)
    private_json = keywrap.unwrap_private_options(descriptor.annotations, ring, layer)
    private = layercipher.parse_private_options(private_json)
    params = layercipher.cipher_parameters(private, public)
    spool_fd = None
    if options.spool_directory is not None:
        spool_fd = layercipher.open_spool(options.spool_directory)
    layercipher.widen_pipe(out_fd)
    warning = layercipher.decrypt_stream(
        params, in_fd, out_fd, descriptor.size, options.accept_digest_mismatch,
        spool_fd=spool_fd,
    )
    return [*ring.warnings, *([warning] if warning else [])]


def _shown_digest(digest: str) -> str:
    """The descriptor's digest as messages name the layer: untrusted, so capped, lest a huge
    one push the node's own facts out of a length-capped message."""
    if not digest:
        return "(no digest)"
    return digest if len(digest) <= 80 else digest[:72] + "..."

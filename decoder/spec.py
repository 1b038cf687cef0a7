"""Protocol constants: media types, annotation names, the cipher id and the payload type URL."""

from __future__ import annotations

PAYLOAD_TYPE_URL = "io.containerd.ocicrypt.v1.Payload"
# containerd sets this in a stream processor's environment to the media type it matched
MEDIA_TYPE_ENV = "STREAM_PROCESSOR_MEDIATYPE"

ANNOTATION_PREFIX = "org.opencontainers.image.enc."
KEYS_ANNOTATION_PREFIX = "org.opencontainers.image.enc.keys."
PUBOPTS_ANNOTATION = "org.opencontainers.image.enc.pubopts"

CIPHER_AES_256_CTR_HMAC_SHA256 = "AES_256_CTR_HMAC_SHA256"

_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

# Encrypted media type -> the plaintext media type it decrypts to.
ENCRYPTED_TO_PLAIN: dict[str, str] = {
    f"{_OCI_LAYER}+encrypted": _OCI_LAYER,
    f"{_OCI_LAYER}+gzip+encrypted": f"{_OCI_LAYER}+gzip",
    f"{_OCI_LAYER}+zstd+encrypted": f"{_OCI_LAYER}+zstd",
    f"{_OCI_NONDIST}+encrypted": _OCI_NONDIST,
    f"{_OCI_NONDIST}+gzip+encrypted": f"{_OCI_NONDIST}+gzip",
    f"{_OCI_NONDIST}+zstd+encrypted": f"{_OCI_NONDIST}+zstd",
    f"{_DOCKER_LAYER}+encrypted": _DOCKER_LAYER,
    f"{_DOCKER_LAYER}.gzip+encrypted": f"{_DOCKER_LAYER}.gzip",
}

# --- the encoder's side: image media types and the layer types it encrypts ----------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"

# Plaintext layer media type -> its encrypted type. Docker layers become OCI types: an
# encrypted image needs an OCI manifest (containers/image refuses encryption in schema2).
PLAIN_TO_ENCRYPTED: dict[str, str] = {
    _OCI_LAYER: f"{_OCI_LAYER}+encrypted",
    f"{_OCI_LAYER}+gzip": f"{_OCI_LAYER}+gzip+encrypted",
    f"{_OCI_LAYER}+zstd": f"{_OCI_LAYER}+zstd+encrypted",
    _OCI_NONDIST: f"{_OCI_NONDIST}+encrypted",
    f"{_OCI_NONDIST}+gzip": f"{_OCI_NONDIST}+gzip+encrypted",
    f"{_OCI_NONDIST}+zstd": f"{_OCI_NONDIST}+zstd+encrypted",
    _DOCKER_LAYER: f"{_OCI_LAYER}+encrypted",
    f"{_DOCKER_LAYER}.gzip": f"{_OCI_LAYER}+gzip+encrypted",
}

# Docker media types -> their OCI equivalents, for a schema2 manifest rewritten as OCI
# (the conversion containers/image makes: foreign layers become nondistributable ones).
DOCKER_TO_OCI: dict[str, str] = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_MANIFEST_LIST: OCI_INDEX,
    DOCKER_CONFIG: OCI_CONFIG,
    _DOCKER_LAYER: _OCI_LAYER,
    f"{_DOCKER_LAYER}.gzip": f"{_OCI_LAYER}+gzip",
    _DOCKER_FOREIGN: _OCI_NONDIST,
    f"{_DOCKER_FOREIGN}.gzip": f"{_OCI_NONDIST}+gzip",
}
FOREIGN_LAYERS = frozenset({_DOCKER_FOREIGN, f"{_DOCKER_FOREIGN}.gzip"})

"""Protocol constants: media types, annotation names, the cipher id and the payload type URL."""

from __future__ import annotations

PAYLOAD_TYPE_URL = "io.containerd.ocicrypt.v1.Payload"

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

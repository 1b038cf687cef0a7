"""The stream-processor payload containerd writes to fd 3.

fd 3 carries a serialized google.protobuf.Any (field 1 type_url, field 2 value) whose type
URL is io.containerd.ocicrypt.v1.Payload and whose value is the JSON of imgcrypt's Payload
struct: {"DecryptConfig":{"Parameters":{name:[base64,...]}|null},"Descriptor":{...}}.
The two-field Any is parsed by hand: importing protobuf would cost more than the whole parse.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

from decoder import gojson
from decoder.errors import PayloadError
from decoder.spec import PAYLOAD_TYPE_URL

PAYLOAD_FD = 3
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
PAYLOAD_TIMEOUT_SECONDS = 30.0

NO_PAYLOAD_HELP = (
    "no decryption payload on fd 3, so the layer's wrapped keys are unknown. containerd passes "
    'one only when CRI pulls with image_decryption key_model = "node" (containerd 2.1+ also '
    "needs use_local_image_pull = true) or when nerdctl or ctr-enc unpack; plain `ctr` "
    "pulls and imports, and processor ids other than io.containerd.ocicrypt.decoder.v1.tar "
    "and ...v1.tar.gzip, pass none (see /opt/ctd-decoder/config/README.md, config/ in the "
    "source). To run it by hand, `ctd-encoder payload` writes a layer's payload for 3< FILE"
)


class Descriptor(NamedTuple):
    """The OCI descriptor of the layer being decrypted."""

    media_type: str
    digest: str
    size: int | None
    annotations: dict[str, str]


class Payload(NamedTuple):
    """imgcrypt's Payload: decryption parameters from the client, and the layer descriptor."""

    parameters: dict[str, list[bytes | None]]
    descriptor: Descriptor


def read_payload_fd(fd: int = PAYLOAD_FD) -> bytes:
    """Read the whole payload from fd 3, which must be an open pipe, file or socket."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise PayloadError(NO_PAYLOAD_HELP) from e
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
        raise PayloadError(
            "fd 3 is open but is not a pipe or file, so it is not a containerd payload; "
            + NO_PAYLOAD_HELP
        )
    import select
    import time

    # containerd writes the whole payload at once and closes its end; a writer that keeps
    # fd 3 open without finishing must not hang the pull forever.
    deadline = time.monotonic() + PAYLOAD_TIMEOUT_SECONDS
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise PayloadError(
                f"the payload on fd 3 did not end within {PAYLOAD_TIMEOUT_SECONDS:.0f} s "
                "(its writer kept the pipe open)"
            )
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError as e:
            raise PayloadError(f"cannot read the payload on fd 3: {e.strerror}") from e
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_PAYLOAD_BYTES:
            raise PayloadError("the payload on fd 3 is larger than 4 MiB; refusing it")
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def encode_payload(descriptor: dict[str, object]) -> bytes:
    """The fd-3 payload containerd would pass for a layer descriptor with no decryption
    parameters (the node key model), for running the decoder by hand (ctd-encoder payload)."""
    import json

    body = json.dumps({"DecryptConfig": {"Parameters": None}, "Descriptor": descriptor},
                      separators=(",", ":")).encode()
    url = PAYLOAD_TYPE_URL.encode()
    return b"\x0a" + _encode_varint(len(url)) + url + b"\x12" + _encode_varint(len(body)) + body


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise PayloadError("the payload on fd 3 is not a protobuf Any (truncated varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise PayloadError("the payload on fd 3 is not a protobuf Any (varint too long)")


def parse_any(data: bytes) -> tuple[str, bytes]:
    """Split a serialized google.protobuf.Any into (type_url, value), skipping unknown fields."""
    type_url = b""
    value = b""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise PayloadError(
                    "the payload on fd 3 is not a protobuf Any (field runs past end)"
                )
            if number == 1:
                type_url = data[pos : pos + length]
            elif number == 2:
                value = data[pos : pos + length]
            pos += length
        else:
            raise PayloadError(f"the payload on fd 3 is not a protobuf Any (wire type {wire_type})")
        if pos > len(data) or number == 0:
            raise PayloadError("the payload on fd 3 is not a protobuf Any (malformed field)")
    try:
        return type_url.decode("utf-8"), value
    except UnicodeDecodeError as e:
        raise PayloadError("the payload's type URL is not UTF-8") from e


def parse_payload(data: bytes) -> Payload:
    """Decode fd-3 bytes into a Payload, with Go's JSON semantics."""
    if not data:
        raise PayloadError(
            "the payload on fd 3 is empty (the caller opened fd 3 but wrote nothing); "
            + NO_PAYLOAD_HELP
        )
    try:
        type_url, value = parse_any(data)
    except PayloadError as e:
        raise PayloadError(f"{e}; by hand, give it what `ctd-encoder payload` writes") from e
    if type_url != PAYLOAD_TYPE_URL:
        shown = f"type URL {type_url!r}" if type_url else "no type URL"
        raise PayloadError(f"the payload on fd 3 has {shown}, expected {PAYLOAD_TYPE_URL!r}")
    try:
        root = gojson.loads(value)
        config = gojson.field(root, "DecryptConfig")
        parameters: dict[str, list[bytes | None]] = {}
        if config is not None:
            for name, values in gojson.items(gojson.field(config, "Parameters")):
                parameters[name] = gojson.as_list(values, gojson.as_bytes)
        desc = gojson.field(root, "Descriptor")
        if desc is None:
            raise PayloadError("the payload has no layer descriptor")
        annotations = {
            k: gojson.as_str(v) for k, v in gojson.items(gojson.field(desc, "annotations"))
        }
        raw_size = gojson.field(desc, "size")
        size = None if raw_size is None else gojson.as_int(raw_size)
        if size is not None and size < 0:
            raise PayloadError(f"the layer descriptor's size is negative ({size})")
        descriptor = Descriptor(
            media_type=gojson.as_str(gojson.field(desc, "mediaType")),
            digest=gojson.as_str(gojson.field(desc, "digest")),
            size=size,
            annotations=annotations,
        )
    except gojson.GoJSONError as e:
        raise PayloadError(f"the payload's JSON does not match imgcrypt's Payload: {e}") from e
    return Payload(parameters=parameters, descriptor=descriptor)

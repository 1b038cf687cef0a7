"""The fd-3 payload: protobuf Any framing (checked against the protobuf library) and Go JSON."""

from __future__ import annotations

import json

import pytest
from google.protobuf import any_pb2

from decoder.errors import PayloadError
from decoder.payload import parse_any, parse_payload
from tests.support import any_bytes

DESCRIPTOR = {
    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
    "digest": "sha256:" + "a" * 64,
    "size": 42,
    "annotations": {"org.opencontainers.image.enc.pubopts": "e30="},
}


def protobuf_any(value: bytes, type_url: str = "io.containerd.ocicrypt.v1.Payload") -> bytes:
    message = any_pb2.Any()
    message.type_url = type_url
    message.value = value
    return message.SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 212, 16383, 16384, 300_000])
def test_any_parse_matches_protobuf(size: int) -> None:
    value = b"v" * size
    assert parse_any(protobuf_any(value)) == ("io.containerd.ocicrypt.v1.Payload", value)


def test_any_skips_unknown_fields() -> None:
    extra = b"\x18\x96\x01" + b"\x25abcd" + b"\x29" + b"12345678" + b"\x3a\x02hi"
    assert parse_any(extra + any_bytes(b"{}"))[1] == b"{}"


def test_captured_containerd_prefix() -> None:
    # containerd 1.6 CRI wrote 0a 21 <type url> 12 d4 01 for a 212-byte JSON value.
    data = protobuf_any(b"x" * 212)
    assert data.startswith(
        bytes.fromhex("0a21") + b"io.containerd.ocicrypt.v1.Payload" + bytes.fromhex("12d401")
    )


def test_node_key_model_payload() -> None:
    body = json.dumps({"DecryptConfig": {"Parameters": None}, "Descriptor": DESCRIPTOR}).encode()
    payload = parse_payload(protobuf_any(body))
    assert payload.parameters == {}
    assert payload.descriptor.media_type == DESCRIPTOR["mediaType"]
    assert payload.descriptor.size == 42
    assert payload.descriptor.annotations == DESCRIPTOR["annotations"]


def test_go_semantics_case_insensitive_bytes_and_nulls() -> None:
    body = json.dumps(
        {
            "decryptconfig": {
                "PARAMETERS": {
                    "privkeys": ["a2V5", [107, 101, 121]],
                    "privkeys-passwords": [None, ""],
                }
            },
            "descriptor": {"MediaType": "m", "Digest": "d", "SIZE": 7},
        }
    ).encode()
    payload = parse_payload(any_bytes(body))
    assert payload.parameters["privkeys"] == [b"key", b"key"]
    assert payload.parameters["privkeys-passwords"] == [None, b""]
    assert payload.descriptor.media_type == "m" and payload.descriptor.size == 7


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "payload on fd 3 is empty"),
        (b"\xff\xff\xff", "not a protobuf Any"),
        (b"\x0a\x50abc", "runs past end"),
        (protobuf_any(b"{}", "type.googleapis.com/google.protobuf.Empty"), "has type URL"),
        (protobuf_any(b"{}", ""), "has no type URL"),
        (protobuf_any(b"not json"), "not valid JSON"),
        (protobuf_any(b"[]"), "expected a JSON object"),
        (protobuf_any(b'{"DecryptConfig":null}'), "no layer descriptor"),
        (protobuf_any(b'{"Descriptor":{"size":"big"}}'), "expected an integer"),
        (
            protobuf_any(b'{"DecryptConfig":{"Parameters":{"privkeys":["AQI"]}},"Descriptor":{}}'),
            "base64",
        ),
        (
            protobuf_any(b'{"DecryptConfig":{"Parameters":{"privkeys":[[256]]}},"Descriptor":{}}'),
            "0 to 255",
        ),
        (protobuf_any(b'{"Descriptor":{"annotations":{"a":1}}}'), "expected a string"),
    ],
)
def test_malformed_payloads(data: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_payload(data)

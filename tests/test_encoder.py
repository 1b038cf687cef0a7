"""ctd-encoder: encrypt, decrypt and layerinfo on OCI layouts and archives built from bytes,
checked with the decoder's own unwrap and cipher, with jwcrypto (an independent JWE
implementation) and against skopeo-made layers. The real skopeo, Go ocicrypt and containerd
checks are in integration/test_encoder.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jwcrypto import jwe as jwcrypto_jwe
from jwcrypto import jwk

from decoder import encode_cli, keywrap, layercipher
from decoder.keys import load_keyring
from decoder.keywrap import jwe
from decoder.payload import parse_payload
from tests.layouts import (
    DOCKER_MANIFEST,
    GZIP,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF,
    TAR,
    ZSTD,
    Layer,
    LayoutBuilder,
    Reader,
    digest,
    random_layers,
    simple_image,
    to_archive,
    tree_state,
)
from tests.support import ASSETS, KEYS, key_dir, payload_bytes, run_decoder, skopeo_fixture

JWE_KEYS = "org.opencontainers.image.enc.keys.jwe"
PUBOPTS = "org.opencontainers.image.enc.pubopts"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


Encoder = Callable[..., Run]


@pytest.fixture
def encoder(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Encoder:
    """ctd-encoder's main() in this process, its output captured."""
    monkeypatch.delenv("CTD_ENCODER_DEBUG", raising=False)

    def run(*args: object) -> Run:
        capsys.readouterr()
        code = encode_cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def ok(result: Run) -> Run:
    assert result.returncode == 0, result.stderr
    return result


def refused(result: Run, *fragments: str, status: int = 1) -> str:
    """A failure: the exit status and exactly one line on stderr naming what is wrong."""
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ctd-encoder: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def ring_of(*names: str) -> Any:
    return load_keyring([], {"privkeys": [(KEYS / n).read_bytes() for n in names],
                             "x509s": []})


def decrypt_with_decoder(descriptor: dict[str, Any], ciphertext: bytes, *keys: str) -> bytes:
    """Decrypt one layer with the decoder's own pipeline pieces (unwrap, cipher)."""
    annotations = descriptor["annotations"]
    private = keywrap.unwrap_private_options(annotations, ring_of(*keys), descriptor["digest"])
    params = layercipher.cipher_parameters(
        layercipher.parse_private_options(private), layercipher.parse_public_options(annotations)
    )
    out: list[bytes] = []

    def collect(_fd: int, data: memoryview) -> None:
        out.append(bytes(data))

    with tempfile.TemporaryFile() as f:
        f.write(ciphertext)
        f.seek(0)
        layercipher.decrypt_stream(params, f.fileno(), -1, descriptor["size"], write=collect)
    return b"".join(out)


def private_options(descriptor: dict[str, Any], *keys: str) -> dict[str, Any]:
    opened = keywrap.unwrap_private_options(descriptor["annotations"], ring_of(*keys), "layer")
    value: dict[str, Any] = json.loads(opened)
    return value


# --- encryption ---------------------------------------------------------------------------

RECIPIENTS = [
    ("rsa2048.pub.pem", "rsa2048-pkcs8.pem", "RSA-OAEP"),
    ("rsa4096.pub.pem", "rsa4096-pkcs8.pem", "RSA-OAEP"),
    ("ec256.pub.pem", "ec256-sec1.pem", "ECDH-ES+A256KW"),
    ("ec384.pub.pem", "ec384-pkcs8.pem", "ECDH-ES+A256KW"),
    ("ec521.pub.pem", "ec521-sec1.der", "ECDH-ES+A256KW"),
    ("rsa2048.pub.jwk.json", "rsa2048-pkcs1.pem", "RSA-OAEP"),
    ("ec256.pub.jwk.json", "ec256-pkcs8.pem", "ECDH-ES+A256KW"),
    ("rsa2048.cert.pem", "rsa2048-pkcs1.der", "RSA-OAEP"),
]


@pytest.mark.parametrize(("public", "private", "alg"), RECIPIENTS, ids=[r[0] for r in RECIPIENTS])
def test_encrypt_round_trips_through_the_decoder(
    encoder: Encoder, tmp_path: Path, public: str, private: str, alg: str
) -> None:
    layers = random_layers(1, 200_000)
    simple_image(tmp_path / "src", layers)
    before = tree_state(tmp_path / "src")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / public}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'dst'}"))
    assert tree_state(tmp_path / "src") == before
    out = Reader(tmp_path / "dst")
    out.check_complete()
    manifest = out.manifest()
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == GZIP + "+encrypted"
    assert layer["size"] == len(layers[0].data)
    ciphertext = out.blob(layer["digest"])
    assert ciphertext != layers[0].data
    assert decrypt_with_decoder(layer, ciphertext, private) == layers[0].data
    options = private_options(layer, private)
    assert options["digest"] == digest(layers[0].data)
    header = jwe.parse(base64.b64decode(layer["annotations"][JWE_KEYS])).recipients[0].header
    assert header["alg"] == alg


@pytest.mark.parametrize(("public", "pem", "private"), [
    ("rsa2048.pub.der", "rsa2048.pub.pem", "rsa2048-pkcs1.pem"),
    ("ec256.pub.der", "ec256.pub.pem", "ec256-sec1.pem"),
])
def test_der_public_key_recipient_round_trips_through_the_decoder_cli(
    encoder: Encoder, tmp_path: Path, public: str, pem: str, private: str
) -> None:
    """A `jwe:` recipient as DER SubjectPublicKeyInfo (openssl pkey -pubin -outform DER):
    the layer it encrypts comes back whole from `python -m decoder` as containerd runs it."""
    der = (KEYS / public).read_bytes()
    assert der[0] == 0x30 and b"-----BEGIN" not in der
    plaintext = Layer(os.urandom(150_000))
    simple_image(tmp_path / "src", [plaintext])
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / public}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'dst'}"))
    out = Reader(tmp_path / "dst")
    (layer,) = out.manifest()["layers"]
    assert layer["mediaType"] == GZIP + "+encrypted"
    blob = base64.b64decode(layer["annotations"][JWE_KEYS])
    (recipient,) = jwe.parse(blob).recipients
    assert recipient.header["kid"] == jwk.JWK.from_pem((KEYS / pem).read_bytes()).thumbprint()
    keys = key_dir(tmp_path, private)
    result = run_decoder(out.blob(layer["digest"]), payload_bytes(layer),
                         ["--decryption-keys-path", str(keys)])
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == plaintext.data
    (tmp_path / "other").mkdir()
    other = run_decoder(out.blob(layer["digest"]), payload_bytes(layer), [
        "--decryption-keys-path", str(key_dir(tmp_path / "other", "ec521-sec1.pem"))])
    assert (other.returncode, other.stdout) == (1, b"")
    assert "no key opens layer" in other.stderr


def test_kid_is_the_rfc7638_thumbprint_and_jwcrypto_decrypts(
    encoder: Encoder, tmp_path: Path
) -> None:
    """Our JWEs carry the recipient's thumbprint as kid; an independent JWE library reads
    them (Go ocicrypt is checked in the integration suite)."""
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    (layer,) = Reader(tmp_path / "dst").manifest()["layers"]
    blob = base64.b64decode(layer["annotations"][JWE_KEYS])
    headers = [r["header"] for r in json.loads(blob)["recipients"]]
    for header, name in zip(headers, ("rsa2048.pub.pem", "ec384.pub.pem"), strict=True):
        expected = jwk.JWK.from_pem((KEYS / name).read_bytes()).thumbprint()
        assert header["kid"] == expected
    for private in ("rsa2048-pkcs8.pem", "ec384-pkcs8.pem"):
        token = jwcrypto_jwe.JWE()
        token.deserialize(blob.decode(), key=jwk.JWK.from_pem((KEYS / private).read_bytes()))
        assert json.loads(token.payload)["digest"].startswith("sha256:")


def test_two_recipients_each_key_alone(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(1)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec521.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    out = Reader(tmp_path / "dst")
    (layer,) = out.manifest()["layers"]
    assert "," not in layer["annotations"][JWE_KEYS], "one JWE for all recipients"
    for key in ("rsa2048-pkcs1.pem", "ec521-pkcs8.pem"):
        assert decrypt_with_decoder(layer, out.blob(layer["digest"]), key) == layers[0].data
    with pytest.raises(Exception, match="no key opens layer"):
        private_options(layer, "other-rsa2048.pem")


@pytest.mark.parametrize(
    ("source", "encrypted"),
    [
        (TAR, TAR + "+encrypted"),
        (GZIP, GZIP + "+encrypted"),
        (ZSTD, ZSTD + "+encrypted"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar",
         "application/vnd.oci.image.layer.nondistributable.v1.tar+encrypted"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
         "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
         "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd+encrypted"),
    ],
)
def test_oci_media_types(encoder: Encoder, tmp_path: Path, source: str, encrypted: str) -> None:
    simple_image(tmp_path / "src", [Layer(os.urandom(999), source)])
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    (layer,) = Reader(tmp_path / "dst").manifest()["layers"]
    assert layer["mediaType"] == encrypted


def test_docker_manifest_becomes_oci_and_foreign_layers_are_kept(
    encoder: Encoder, tmp_path: Path
) -> None:
    docker = "application/vnd.docker.image.rootfs.diff.tar"
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    layers = [
        Layer(os.urandom(500), docker + ".gzip"),
        Layer(os.urandom(600), foreign, extra={"urls": ["https://example.invalid/l"]}),
        Layer(os.urandom(700), docker),
    ]
    builder = simple_image(tmp_path / "src", layers, docker=True)
    source_manifest = Reader(builder.root).manifest()
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    out = Reader(tmp_path / "dst")
    out.check_complete()
    assert out.entry()["mediaType"] == OCI_MANIFEST
    manifest = out.manifest()
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [la["mediaType"] for la in manifest["layers"]] == [
        GZIP + "+encrypted",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        TAR + "+encrypted",
    ]
    kept = manifest["layers"][1]
    assert kept["digest"] == digest(layers[1].data)
    assert kept["urls"] == ["https://example.invalid/l"]
    # the config blob is untouched; its descriptor takes the OCI type, as containers/image does
    assert manifest["config"]["digest"] == source_manifest["config"]["digest"]
    assert manifest["config"]["mediaType"] == OCI_CONFIG
    assert source_manifest["mediaType"] == DOCKER_MANIFEST


def test_annotations_are_kept(encoder: Encoder, tmp_path: Path) -> None:
    layer = Layer(os.urandom(100), annotations={"com.example.layer": "kept",
                                                 "org.opencontainers.image.enc.stale": "x"})
    builder = LayoutBuilder(tmp_path / "src")
    builder.add(builder.manifest([layer], annotations={"com.example.manifest": "kept"}),
                "latest", annotations={"com.example.entry": "kept"})
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}:v1"))
    out = Reader(tmp_path / "dst")
    entry = out.entry("v1")
    assert entry["annotations"] == {"com.example.entry": "kept", REF: "v1"}
    manifest = out.manifest("v1")
    assert manifest["annotations"] == {"com.example.manifest": "kept"}
    annotations = manifest["layers"][0]["annotations"]
    assert annotations["com.example.layer"] == "kept"
    assert "org.opencontainers.image.enc.stale" not in annotations
    assert set(annotations) == {"com.example.layer", JWE_KEYS, PUBOPTS}


# --- selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(("selection", "expected"), [
    (["--layer", "-1"], [False, False, True]),
    (["--layer", "0"], [True, False, False]),
    (["--layer", "0", "--layer", "-2"], [True, True, False]),
    ([], [True, True, True]),
])
def test_layer_selection(
    encoder: Encoder, tmp_path: Path, selection: list[str], expected: list[bool]
) -> None:
    layers = random_layers(3)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", *selection,
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    got = Reader(tmp_path / "dst").manifest()["layers"]
    assert [la["mediaType"].endswith("+encrypted") for la in got] == expected
    for layer, source, encrypted in zip(got, layers, expected, strict=True):
        assert (layer["digest"] == digest(source.data)) is not encrypted


def test_a_layer_listed_twice_is_not_left_in_plain_by_layer(
    encoder: Encoder, tmp_path: Path
) -> None:
    secret, other = random_layers(2)
    simple_image(tmp_path / "src", [secret, other, secret])
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--layer", "0",
                    f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"),
            f"layer 0 of linux/amd64 ({digest(secret.data)}) is also layer 2 of linux/amd64",
            "--layer options", "unencrypted")
    assert not (tmp_path / "dst").exists()
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--layer", "0",
               "--layer", "2", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    got = Reader(tmp_path / "dst").manifest()["layers"]
    assert [la["mediaType"].endswith("+encrypted") for la in got] == [True, False, True]
    assert got[0]["digest"] == got[2]["digest"], "one blob, encrypted once"


def test_a_layer_shared_with_a_platform_left_out_is_refused(
    encoder: Encoder, tmp_path: Path
) -> None:
    builder = LayoutBuilder(tmp_path / "src")
    shared, own = random_layers(2)
    amd64 = builder.manifest([shared, own], arch="amd64")
    arm64 = builder.manifest([shared], arch="arm64")
    builder.add(builder.index([(amd64, "linux/amd64"), (arm64, "linux/arm64")]), "multi")
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    "--platform", "linux/amd64", f"oci:{tmp_path / 'src'}",
                    f"oci:{tmp_path / 'dst'}"),
            f"({digest(shared.data)}) is also layer 0 of linux/arm64",
            "--platform options")
    assert not (tmp_path / "dst").exists()
    # its own layer alone is fine, and so are both platforms
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--platform",
               "linux/amd64", "--layer", "1", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'one'}"))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'all'}"))


def test_a_layer_that_is_also_a_config_or_an_index_entry_is_refused(
    encoder: Encoder, tmp_path: Path
) -> None:
    """Configs and non-manifest index entries are copied as they are: a blob among them must
    not be a layer this run encrypts."""
    secret = Layer(os.urandom(3000), TAR)
    as_config = LayoutBuilder(tmp_path / "config")
    as_config.blob(secret.data)
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.example.config.v1+json",
                       "digest": digest(secret.data), "size": len(secret.data)},
            "layers": [secret.descriptor()]}
    as_config.add(as_config.json_blob(body, OCI_MANIFEST))
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'config'}", f"oci:{tmp_path / 'dst'}"),
            f"({digest(secret.data)}) is also the config of the image, which is copied as it is")
    as_entry = LayoutBuilder(tmp_path / "entry")
    manifest = as_entry.manifest([secret], arch="amd64")
    index = as_entry.json_blob({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**manifest, "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "application/octet-stream", "digest": digest(secret.data),
         "size": len(secret.data)}]}, OCI_INDEX)
    as_entry.add(index)
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'entry'}", f"oci:{tmp_path / 'dst'}"),
            "is also an index entry of type application/octet-stream")
    assert not (tmp_path / "dst").exists()


def test_a_layer_whose_twin_is_a_foreign_layer_says_so(encoder: Encoder, tmp_path: Path) -> None:
    builder = LayoutBuilder(tmp_path / "src")
    data = os.urandom(3000)
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    amd64 = builder.manifest([Layer(data, TAR)], arch="amd64")
    arm64 = builder.manifest([Layer(data, foreign)], arch="arm64")
    builder.add(builder.index([(amd64, "linux/amd64"), (arm64, "linux/arm64")]), "multi")
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"),
            "is also layer 0 of linux/arm64, which this run would leave in plain (foreign "
            "layer, which is never encrypted)", "leave this layer out with --layer")


def two_platform_image(root: Path) -> tuple[LayoutBuilder, dict[str, Any], dict[str, Any]]:
    builder = LayoutBuilder(root)
    amd64 = builder.manifest(random_layers(2), arch="amd64")
    arm64 = builder.manifest(random_layers(1), arch="arm64")
    builder.add(builder.index([(amd64, "linux/amd64"), (arm64, "linux/arm64")]), "multi")
    return builder, amd64, arm64


def test_platform_selection_keeps_the_other_manifests(encoder: Encoder, tmp_path: Path) -> None:
    _, amd64, arm64 = two_platform_image(tmp_path / "src")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               "--platform", "linux/arm64", f"oci:{tmp_path / 'src'}:multi",
               f"oci:{tmp_path / 'dst'}:multi"))
    out = Reader(tmp_path / "dst")
    out.check_complete()
    entry = out.entry("multi")
    assert entry["mediaType"] == OCI_INDEX
    index = out.json(entry["digest"])
    by_arch = {m["platform"]["architecture"]: m for m in index["manifests"]}
    assert by_arch["amd64"]["digest"] == amd64["digest"], "unselected platform unchanged"
    assert by_arch["arm64"]["digest"] != arm64["digest"]
    assert by_arch["arm64"]["platform"] == {"architecture": "arm64", "os": "linux"}
    arm_layers = out.json(by_arch["arm64"]["digest"])["layers"]
    assert all(la["mediaType"] == GZIP + "+encrypted" for la in arm_layers)


def arm_variants_image(root: Path) -> dict[str, dict[str, Any]]:
    """An index with linux/amd64, linux/arm/v6 and linux/arm/v7; their index entries."""
    builder = LayoutBuilder(root)
    manifests = {
        "linux/amd64": builder.manifest(random_layers(1), arch="amd64"),
        "linux/arm/v6": builder.manifest(random_layers(2), arch="arm"),
        "linux/arm/v7": builder.manifest(random_layers(2, 4000), arch="arm"),
    }
    index = builder.index([(d, p) for p, d in manifests.items()])
    builder.add(index, "multi")
    children = Reader(root).json(index["digest"])["manifests"]
    return {platform: child for platform, child in zip(manifests, children, strict=True)}


def platform_name(platform: dict[str, str]) -> str:
    return "/".join(platform[k] for k in ("os", "architecture", "variant") if k in platform)


@pytest.mark.parametrize(("chosen", "changed"), [
    ("linux/arm/v7", {"linux/arm/v7"}),
    ("linux/arm/v6", {"linux/arm/v6"}),
    ("linux/arm", {"linux/arm/v6", "linux/arm/v7"}),  # no variant: every variant of arm
])
def test_platform_variant_selects_only_its_manifest(
    encoder: Encoder, tmp_path: Path, chosen: str, changed: set[str]
) -> None:
    before = arm_variants_image(tmp_path / "src")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--platform", chosen,
               f"oci:{tmp_path / 'src'}:multi", f"oci:{tmp_path / 'dst'}:multi"))
    out = Reader(tmp_path / "dst")
    out.check_complete()
    after = {platform_name(c["platform"]): c
             for c in out.json(out.entry("multi")["digest"])["manifests"]}
    assert list(after) == list(before), "same platforms, same order"
    for platform, entry in after.items():
        layers = out.json(entry["digest"])["layers"]
        source_layers = Reader(tmp_path / "src").json(before[platform]["digest"])["layers"]
        if platform in changed:
            assert entry["digest"] != before[platform]["digest"]
            assert entry["platform"] == before[platform]["platform"]
            assert all(la["mediaType"] == GZIP + "+encrypted" for la in layers)
            assert len(layers) == len(source_layers)
        else:
            assert entry == before[platform], f"{platform} is kept byte for byte"
            assert layers == source_layers
    info = json.loads(ok(encoder("layerinfo", "--json", "--platform", chosen,
                                 f"oci:{tmp_path / 'dst'}:multi")).stdout)
    assert sorted(m["platform"] for m in info["manifests"]) == sorted(changed)
    assert all(la["encrypted"] for m in info["manifests"] for la in m["layers"])


def test_an_absent_variant_is_refused(encoder: Encoder, tmp_path: Path) -> None:
    arm_variants_image(tmp_path / "src")
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    "--platform", "linux/arm/v8", f"oci:{tmp_path / 'src'}:multi",
                    f"oci:{tmp_path / 'dst'}:multi"),
            "platform linux/arm/v8 is not in", "linux/arm/v6", "linux/arm/v7")
    assert not (tmp_path / "dst").exists()


def test_all_platforms_by_default(encoder: Encoder, tmp_path: Path) -> None:
    two_platform_image(tmp_path / "src")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--layer", "-1",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"))
    out = Reader(tmp_path / "dst")
    index = out.json(out.entry("multi")["digest"])
    for child in index["manifests"]:
        layers = out.json(child["digest"])["layers"]
        assert layers[-1]["mediaType"].endswith("+encrypted")
        assert not any(la["mediaType"].endswith("+encrypted") for la in layers[:-1])


# --- recipients added to encrypted layers -------------------------------------------------


def test_adding_a_recipient_keeps_the_ciphertext(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(2)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}", "--layer", "0",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'one'}"))
    first = Reader(tmp_path / "one").manifest()["layers"]
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"),
            "already encrypted", "--key")
    assert not (tmp_path / "two").exists()
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    "--key", KEYS / "other-rsa2048.pem",
                    f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"),
            "cannot add recipients", "no key opens layer")
    assert not (tmp_path / "two").exists()
    result = ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                        "--key", KEYS / "rsa2048-pkcs8.pem",
                        f"oci:{tmp_path / 'one'}", f"oci:{tmp_path / 'two'}"))
    assert "already encrypted; added jwe:" in result.stdout
    out = Reader(tmp_path / "two")
    out.check_complete()
    second = out.manifest()["layers"]
    assert second[0]["digest"] == first[0]["digest"], "same ciphertext"
    assert second[0]["annotations"][PUBOPTS] == first[0]["annotations"][PUBOPTS]
    assert second[0]["annotations"][JWE_KEYS].startswith(first[0]["annotations"][JWE_KEYS] + ",")
    assert second[1]["mediaType"] == GZIP + "+encrypted", "the plain layer got encrypted"
    ciphertext = out.blob(second[0]["digest"])
    for key in ("rsa2048-pkcs1.pem", "ec256-sec1.pem"):
        assert decrypt_with_decoder(second[0], ciphertext, key) == layers[0].data
    assert private_options(second[1], "ec256-pkcs8.pem")["digest"] == digest(layers[1].data)


# --- decryption ---------------------------------------------------------------------------


def test_decrypt_restores_the_original_layers(encoder: Encoder, tmp_path: Path) -> None:
    layers = [Layer(os.urandom(3000), GZIP), Layer(os.urandom(4000), ZSTD),
              Layer(os.urandom(2000), TAR, annotations={"com.example": "x"})]
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa4096.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    ok(encoder("decrypt", "--key", KEYS / "rsa4096-pkcs8.pem", f"oci:{tmp_path / 'enc'}",
               f"oci:{tmp_path / 'dec'}"))
    out = Reader(tmp_path / "dec")
    out.check_complete()
    got = out.manifest()["layers"]
    assert got == [layer.descriptor() for layer in layers]


def test_layers_of_many_chunks_round_trip_through_both_threads(
    encoder: Encoder, tmp_path: Path
) -> None:
    """Layers of several chunks cycle through the buffers the second thread hashes from."""
    layers = [Layer(os.urandom(3 * layercipher.CHUNK + 5), GZIP),
              Layer(os.urandom(2 * layercipher.CHUNK), TAR)]
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    encrypted = Reader(tmp_path / "enc")
    encrypted.check_complete()  # every blob matches its digest
    for layer, descriptor in zip(layers, encrypted.manifest()["layers"], strict=True):
        decoded = run_decoder(encrypted.blob(descriptor["digest"]), payload_bytes(descriptor),
                              ["--decryption-keys-path", str(key_dir(tmp_path, "ec256-pkcs8.pem"))])
        assert decoded.returncode == 0, decoded.stderr
        assert decoded.stdout == layer.data
    ok(encoder("decrypt", "--key", KEYS / "ec256-pkcs8.pem", f"oci:{tmp_path / 'enc'}",
               f"oci:{tmp_path / 'dec'}"))
    out = Reader(tmp_path / "dec")
    out.check_complete()
    assert out.manifest()["layers"] == [layer.descriptor() for layer in layers]


def test_decrypt_only_some_layers(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(2)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    ok(encoder("decrypt", "--key", KEYS / "ec384-sec1.pem", "--layer", "-1",
               f"oci:{tmp_path / 'enc'}", f"oci:{tmp_path / 'dec'}"))
    got = Reader(tmp_path / "dec").manifest()["layers"]
    assert got[0]["mediaType"] == GZIP + "+encrypted"
    assert got[1] == layers[1].descriptor()


def fixture_layout(root: Path, name: str) -> tuple[bytes, dict[str, Any], str]:
    blob, descriptor, plaintext_digest = skopeo_fixture(name)
    builder = LayoutBuilder(root)
    builder.blob(blob)
    config = builder.json_blob({"architecture": "amd64", "os": "linux"}, OCI_CONFIG)
    builder.add(builder.json_blob({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": config, "layers": [descriptor]}, OCI_MANIFEST))
    return blob, descriptor, plaintext_digest


@pytest.mark.parametrize(("fixture", "key"), [
    ("rsa2048", "rsa2048-pkcs8.pem"), ("rsa4096", "rsa4096-pkcs8.pem"),
    ("ec256", "ec256-pkcs8.pem"), ("ec384", "ec384-pkcs8.pem"), ("ec521", "ec521-pkcs8.pem"),
    ("two-recipients", "ec384-sec1.pem"), ("zstd", "ec256-sec1.pem"),
])
def test_decrypt_skopeo_layers(encoder: Encoder, tmp_path: Path, fixture: str, key: str) -> None:
    _, descriptor, plaintext_digest = fixture_layout(tmp_path / "src", fixture)
    ok(encoder("decrypt", "--key", KEYS / key, f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'dst'}"))
    (layer,) = Reader(tmp_path / "dst").manifest()["layers"]
    assert layer["digest"] == plaintext_digest
    assert layer["mediaType"] == descriptor["mediaType"].removesuffix("+encrypted")
    assert "annotations" not in layer


@pytest.mark.parametrize("fixture", ["tar-recompressed", "zstd-recompressed"])
def test_decrypt_refuses_a_digest_mismatch_unless_accepted(
    encoder: Encoder, tmp_path: Path, fixture: str
) -> None:
    blob, _, actual = fixture_layout(tmp_path / "src", fixture)
    refused(encoder("decrypt", "--key", KEYS / "ec256-pkcs8.pem",
                              f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"),
                      "does not match the digest in its private options",
                      "--accept-digest-mismatch", "nothing was written")
    assert not (tmp_path / "dst").exists()
    assert not list(tmp_path.glob(".dst*")), "no staging directory left behind"
    result = ok(encoder("decrypt", "--key", KEYS / "ec256-pkcs8.pem",
                        "--accept-digest-mismatch", f"oci:{tmp_path / 'src'}",
                        f"oci:{tmp_path / 'dst'}"))
    assert "ctd-encoder: warning:" in result.stderr
    (layer,) = Reader(tmp_path / "dst").manifest()["layers"]
    if actual is not None:  # what the fixture's generator measured
        assert layer["digest"] == actual
    private = private_options(fixture_layout(tmp_path / "again", fixture)[1], "ec256-sec1.pem")
    assert layer["digest"] != private["digest"]
    assert layer["size"] == len(blob)


def test_decrypt_refuses_a_tampered_layer(encoder: Encoder, tmp_path: Path) -> None:
    blob, descriptor, _ = fixture_layout(tmp_path / "src", "rsa2048")
    # same digest as its descriptor (so it passes the blob check), but another HMAC
    pubopts = json.loads(base64.b64decode(descriptor["annotations"][PUBOPTS]))
    pubopts["hmac"] = base64.b64encode(bytes(32)).decode()
    tampered = dict(descriptor, annotations={**descriptor["annotations"],
                                             PUBOPTS: base64.b64encode(
                                                 json.dumps(pubopts).encode()).decode()})
    fixture = LayoutBuilder(tmp_path / "tampered")
    fixture.blob(blob)
    config = fixture.json_blob({"architecture": "amd64", "os": "linux"}, OCI_CONFIG)
    fixture.add(fixture.json_blob({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": config, "layers": [tampered]}, OCI_MANIFEST))
    refused(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem",
                    f"oci:{tmp_path / 'tampered'}", f"oci:{tmp_path / 'dst'}"),
            "failed its HMAC check", "nothing was written")
    assert not (tmp_path / "dst").exists()


# --- layouts, archives, atomicity ---------------------------------------------------------


def test_archive_in_and_out(encoder: Encoder, tmp_path: Path) -> None:
    layers = random_layers(2, 70_000)
    simple_image(tmp_path / "src", layers, ref="app")
    to_archive(tmp_path / "src", tmp_path / "src.tar")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci-archive:{tmp_path / 'src.tar'}:app", f"oci-archive:{tmp_path / 'enc.tar'}"))
    with tarfile.open(tmp_path / "enc.tar") as tar:
        names = tar.getnames()
        assert names[0] == "oci-layout"
        assert "index.json" in names
        tar.extractall(tmp_path / "enc", filter="data")
    out = Reader(tmp_path / "enc")
    out.check_complete()
    assert all(la["mediaType"].endswith("+encrypted") for la in out.manifest("app")["layers"])
    ok(encoder("decrypt", "--key", KEYS / "ec256-sec1.der",
               f"oci-archive:{tmp_path / 'enc.tar'}:app", f"oci:{tmp_path / 'dec'}:app"))
    assert Reader(tmp_path / "dec").manifest("app")["layers"] == [la.descriptor() for la in layers]


def test_writing_into_an_existing_layout_keeps_its_other_images(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    other = simple_image(tmp_path / "dst", random_layers(1), ref="other")
    before = tree_state(other.root)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}:enc"))
    after = tree_state(other.root)
    assert {k: v for k, v in after.items() if k in before and k != "index.json"} == {
        k: v for k, v in before.items() if k != "index.json"}
    out = Reader(tmp_path / "dst")
    out.check_complete()
    assert sorted(e["annotations"][REF] for e in out.index["manifests"]) == ["enc", "other"]
    # again under the same REF: replaced, not duplicated
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}:enc"))
    assert len(Reader(tmp_path / "dst").index["manifests"]) == 2


def test_existing_archive_keeps_its_other_images(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    simple_image(tmp_path / "old", random_layers(1), ref="other")
    to_archive(tmp_path / "old", tmp_path / "dst.tar")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci-archive:{tmp_path / 'dst.tar'}:enc"))
    with tarfile.open(tmp_path / "dst.tar") as tar:
        tar.extractall(tmp_path / "dst", filter="data")
    out = Reader(tmp_path / "dst")
    out.check_complete()
    assert sorted(e["annotations"][REF] for e in out.index["manifests"]) == ["enc", "other"]


def test_same_layout_under_another_ref(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "img", random_layers(1), ref="plain")
    plain = Reader(tmp_path / "img").entry("plain")
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'img'}:plain", f"oci:{tmp_path / 'img'}"),
            "would replace the source image")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'img'}:plain", f"oci:{tmp_path / 'img'}:enc"))
    out = Reader(tmp_path / "img")
    out.check_complete()
    assert out.entry("plain") == plain
    # a layer that has the recipient already: the refusal is still its only output
    again = encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    "--key", KEYS / "ec256-sec1.pem", f"oci:{tmp_path / 'img'}:enc",
                    f"oci:{tmp_path / 'img'}:enc")
    refused(again, "would replace the source image")
    assert again.stdout == ""


@pytest.mark.parametrize("damage", ["layer", "config"])
def test_corrupt_source_blob_writes_nothing(
    encoder: Encoder, tmp_path: Path, damage: str
) -> None:
    layers = random_layers(2, 50_000)
    builder = simple_image(tmp_path / "src", layers)
    manifest = Reader(builder.root).manifest()
    target = manifest["layers"][1] if damage == "layer" else manifest["config"]
    path = builder.root / "blobs" / "sha256" / target["digest"].split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    before = tree_state(builder.root)
    existing = simple_image(tmp_path / "existing", random_layers(1), ref="other")
    existing_before = tree_state(existing.root)
    for destination in (f"oci:{tmp_path / 'dst'}", f"oci-archive:{tmp_path / 'dst.tar'}",
                        f"oci:{existing.root}:enc"):
        refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                        f"oci:{builder.root}", destination),
                target["digest"])
    assert tree_state(builder.root) == before
    assert tree_state(existing.root) == existing_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "src"]


BAD_INPUTS: list[tuple[list[str], str]] = [
    (["--recipient", "jwe:/nonexistent/key.pem"], "recipient key /nonexistent/key.pem cannot be"),
    (["--recipient", f"jwe:{KEYS / 'rsa2048-pkcs8.pem'}"], "holds a private key"),
    (["--recipient", f"jwe:{ASSETS / 'kat_aes_ctr_hmac.json'}"], "kat_aes_ctr_hmac.json"),
    (["--recipient", f"jwe:{KEYS / 'ed25519.pem'}"], "holds a private key"),
    (["--recipient", "pgp:alice@example.com"], "PGP recipients (pgp:) are not supported"),
    (["--recipient", "provider:kms:x"], "key-provider recipients"),
    (["--recipient", f"rsa:{KEYS / 'rsa2048.pub.pem'}"], "unknown recipient type 'rsa:'"),
    (["--recipient", f"{KEYS / 'rsa2048.pub.pem'}"], "names no scheme: use jwe:"),
    (["--recipient", f"pkcs7:{KEYS / 'rsa2048.pub.pem'}"], "holds no PEM CERTIFICATE"),
    (["--layer", "2"], "layer index 2 is out of range: linux/amd64 in oci:"),
    (["--layer", "-3"], "layer index -3 is out of range"),
    (["--platform", "linux/s390x"], "platform linux/s390x is not in"),
    (["--platform", "linux"], "is not OS/ARCH[/VARIANT]"),
    (["--key", "/nonexistent/key.pem"], "key file /nonexistent/key.pem cannot be read"),
    (["--key", str(KEYS / "rsa2048-pkcs8-encrypted.pem")], "no password"),
    (["--key", f"{KEYS / 'rsa2048-pkcs8-encrypted.pem'}:wrong"], "password is wrong"),
    (["--key", str(KEYS / "rsa2048.pub.pem")], "public key, not a private key"),
    (["--layer", "x"], "invalid int value"),
    ([], "the following arguments are required: --recipient"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(
    encoder: Encoder, tmp_path: Path, extra: list[str], message: str
) -> None:
    simple_image(tmp_path / "src", random_layers(2))
    recipient = [] if any(a == "--recipient" for a in extra) or not extra else [
        "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}"]
    line = refused(encoder("encrypt", *recipient, *extra, f"oci:{tmp_path / 'src'}",
                           f"oci:{tmp_path / 'dst'}"), message)
    assert "wrong" not in line.replace("password is wrong", ""), "no password in messages"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


LOCATION_ERRORS: list[tuple[str, str, str]] = [
    ("oci:{tmp}/missing", "oci:{tmp}/dst", "does not exist"),
    ("oci:{tmp}/notlayout", "oci:{tmp}/dst", "is not an OCI image layout"),
    ("oci:{tmp}/src:nope", "oci:{tmp}/dst", "has no image named 'nope' (refs: latest, second)"),
    ("oci:{tmp}/src", "oci:{tmp}/dst", "holds 2 images; name one"),
    ("docker://example/x", "oci:{tmp}/dst", "is not an image location"),
    ("oci-archive:{tmp}/notlayout", "oci:{tmp}/dst", "is a directory"),
    ("oci-archive:{tmp}/garbage.tar", "oci:{tmp}/dst", "is not an oci-archive"),
    ("oci:{tmp}/src:latest", "oci:{tmp}/notlayout", "exists and is not an OCI image layout"),
    ("oci:{tmp}/src:latest", "oci:{tmp}/no/such/dir", "does not exist"),
    ("oci:{tmp}/src:latest", "oci:", "names no directory"),
]


@pytest.mark.parametrize(("src", "dst", "message"), LOCATION_ERRORS,
                         ids=[m for _, _, m in LOCATION_ERRORS])
def test_bad_locations(encoder: Encoder, tmp_path: Path, src: str, dst: str, message: str) -> None:
    builder = simple_image(tmp_path / "src", random_layers(1))
    builder.add(builder.manifest(random_layers(1)), "second")
    (tmp_path / "notlayout").mkdir()
    (tmp_path / "notlayout" / "README").write_text("not a layout")
    (tmp_path / "garbage.tar").write_bytes(os.urandom(2048))
    before = tree_state(tmp_path)
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    src.format(tmp=tmp_path), dst.format(tmp=tmp_path)), message)
    assert tree_state(tmp_path) == before


def test_decrypt_with_the_wrong_key(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    refused(encoder("decrypt", "--key", KEYS / "other-rsa2048.pem", f"oci:{tmp_path / 'enc'}",
                    f"oci:{tmp_path / 'dec'}"),
            "no key opens layer 0 of linux/amd64", "other-rsa2048.pem", "RSA-OAEP kid")
    assert not (tmp_path / "dec").exists()


def test_nothing_to_do_is_an_error(encoder: Encoder, tmp_path: Path) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    refused(encoder("decrypt", "--key", KEYS / "rsa2048-pkcs8.pem", f"oci:{tmp_path / 'src'}",
                    f"oci:{tmp_path / 'dst'}"), "nothing to decrypt: no selected layer of oci:",
            " is encrypted; nothing was written")
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    simple_image(tmp_path / "foreign", [Layer(b"x", foreign)])
    refused(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
                    f"oci:{tmp_path / 'foreign'}", f"oci:{tmp_path / 'dst'}"),
            "nothing to encrypt", "foreign layer")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("form", ["{key}:s3cret", "{key}:pass=s3cret", "{key}:file={pw}"])
def test_key_passwords(encoder: Encoder, tmp_path: Path, form: str) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    (tmp_path / "pw").write_text("s3cret\n")
    key = form.format(key=KEYS / "rsa2048-pkcs8-encrypted.pem", pw=tmp_path / "pw")
    result = ok(encoder("decrypt", "--key", key, f"oci:{tmp_path / 'enc'}",
                        f"oci:{tmp_path / 'dec'}"))
    assert "s3cret" not in result.stdout + result.stderr


def test_key_passwords_from_a_pipe_a_crlf_file_and_beside_the_key(
    encoder: Encoder, tmp_path: Path
) -> None:
    """A 100-character password comes whole through fd=N even when a pipe delivers it in
    pieces; a CRLF file loses its CRLF; KEY.password beside the key is used as the decoder
    uses it; with none of them, the error says how to give one."""
    long_password = "p" * 100
    private = tmp_path / "long.pem"
    subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout",
                    f"pass:{long_password}", "-in", str(KEYS / "rsa2048-pkcs1.pem"),
                    "-out", str(private)], check=True)
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    read_end, write_end = os.pipe()
    writer = subprocess.Popen(  # two writes, the second after a pause: two reads
        [sys.executable, "-c", "import os, sys, time; os.write(1, sys.argv[1][:30].encode()); "
         "time.sleep(0.3); os.write(1, sys.argv[1][30:].encode() + b'\\n')", long_password],
        stdout=write_end)
    os.close(write_end)
    try:
        ok(encoder("layerinfo", "--key", f"{private}:fd={read_end}", f"oci:{tmp_path / 'enc'}"))
    finally:
        os.close(read_end)
        writer.wait()
    other = tmp_path / "other.pem"  # two --key reading one fd: a line each
    subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout", "pass:pw2",
                    "-in", str(KEYS / "ec256-pkcs8.pem"), "-out", str(other)], check=True)
    read_end, write_end = os.pipe()
    os.write(write_end, long_password.encode() + b"\npw2\n")
    os.close(write_end)
    try:
        ok(encoder("layerinfo", "--key", f"{private}:fd={read_end}", "--key",
                   f"{other}:fd={read_end}", f"oci:{tmp_path / 'enc'}"))
    finally:
        os.close(read_end)
    (tmp_path / "crlf").write_bytes(long_password.encode() + b"\r\n")
    ok(encoder("layerinfo", "--key", f"{private}:file={tmp_path / 'crlf'}",
               f"oci:{tmp_path / 'enc'}"))
    refused(encoder("layerinfo", "--key", private, f"oci:{tmp_path / 'enc'}"),
            f"--key {private}: encrypted private key and no password for it (give it as "
            f"--key {private}:file=PASSWORD-FILE, or put it in {private}.password)")
    (tmp_path / "long.pem.password").write_text(long_password + "\n")
    ok(encoder("layerinfo", "--key", private, f"oci:{tmp_path / 'enc'}"))
    (tmp_path / "long.pem.password").write_text("wrong\n")
    refused(encoder("layerinfo", "--key", private, f"oci:{tmp_path / 'enc'}"),
            "password is wrong")


def test_key_password_beside_a_link_s_target_and_a_wrong_one_named(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(1))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    (tmp_path / "vault").mkdir()
    target = tmp_path / "vault" / "key.pem"
    target.write_bytes((KEYS / "rsa2048-pkcs8-encrypted.pem").read_bytes())
    (tmp_path / "vault" / "key.pem.password").write_text("s3cret\n")
    link = tmp_path / "link.pem"
    link.symlink_to(target)
    ok(encoder("layerinfo", "--key", link, f"oci:{tmp_path / 'enc'}"))
    (tmp_path / "link.pem.password").write_text("nope\n")  # a wrong one beside the link
    ok(encoder("layerinfo", "--key", link, f"oci:{tmp_path / 'enc'}"))
    (tmp_path / "vault" / "key.pem.password").write_text("nope either\n")
    refused(encoder("layerinfo", "--key", link, f"oci:{tmp_path / 'enc'}"),
            f"--key {link}: encrypted private key and its password is wrong (from "
            f"{tmp_path / 'link.pem.password'})")


def test_payload_runs_the_decoder_by_hand(encoder: Encoder, tmp_path: Path) -> None:
    """`ctd-encoder payload` writes what containerd puts on fd 3, and names the blob: with
    both, ctd-decoder decrypts the layer as in a pull."""
    layers = random_layers(2)
    simple_image(tmp_path / "src", layers)
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    result = ok(encoder("payload", "--layer", "-1", "-o", tmp_path / "layer.payload",
                        f"oci:{tmp_path / 'enc'}"))
    top = Reader(tmp_path / "enc").manifest()["layers"][1]
    blob = tmp_path / "enc" / "blobs" / "sha256" / top["digest"].split(":")[1]
    assert result.stderr == (f"layer 1 of linux/amd64 ({top['digest']}): {GZIP}+encrypted, "
                             f"blob {blob}\n")
    payload = (tmp_path / "layer.payload").read_bytes()
    parsed = parse_payload(payload)
    assert parsed.parameters == {}
    assert parsed.descriptor == (top["mediaType"], top["digest"], top["size"],
                                 top["annotations"])
    decrypted = run_decoder(blob.read_bytes(), payload, ["--decryption-keys-path",
                                                         str(key_dir(tmp_path, "ec256-sec1.pem"))])
    assert decrypted.returncode == 0, decrypted.stderr
    assert decrypted.stdout == layers[1].data


def test_payload_needs_one_platform(encoder: Encoder, tmp_path: Path) -> None:
    two_platform_image(tmp_path / "src")
    refused(encoder("payload", "--layer", "0", "-o", tmp_path / "p", f"oci:{tmp_path / 'src'}"),
            "has several platforms (linux/amd64, linux/arm64); pick one with --platform")
    assert not (tmp_path / "p").exists()
    refused(encoder("payload", "--layer", "0", "--platform", "linux/arm64", "-o", tmp_path / "p",
                    f"oci:{tmp_path / 'src'}"),
            "layer 0 of linux/arm64", f"is not encrypted ({GZIP}): ctd-decoder would refuse it")
    assert not (tmp_path / "p").exists()
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    ok(encoder("payload", "--layer", "0", "--platform", "linux/arm64", "-o", tmp_path / "p",
               f"oci:{tmp_path / 'enc'}"))


# --- layerinfo ----------------------------------------------------------------------------


def test_layerinfo_names_recipients_and_the_keys_that_open(
    encoder: Encoder, tmp_path: Path
) -> None:
    simple_image(tmp_path / "src", random_layers(3))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'rsa2048.pub.pem'}",
               "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--layer", "0",
               f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec384.pub.pem'}", "--layer", "1",
               f"oci:{tmp_path / 'enc'}", f"oci:{tmp_path / 'enc2'}"))
    result = ok(encoder("layerinfo", "--json", "--key", KEYS / "ec256-sec1.pem",
                        "--key", KEYS / "ec384-pkcs8.pem", f"oci:{tmp_path / 'enc2'}"))
    info = json.loads(result.stdout)
    (manifest,) = info["manifests"]
    assert manifest["platform"] == "linux/amd64"
    first, second, third = manifest["layers"]
    rsa_kid = jwk.JWK.from_pem((KEYS / "rsa2048.pub.pem").read_bytes()).thumbprint()
    ec_kid = jwk.JWK.from_pem((KEYS / "ec256.pub.pem").read_bytes()).thumbprint()
    assert first["schemes"] == ["jwe"]
    assert [(r["alg"], r["kid"], r.get("key")) for r in first["recipients"]] == [
        ("RSA-OAEP", rsa_kid, None),
        ("ECDH-ES+A256KW", ec_kid, str(KEYS / "ec256-sec1.pem")),
    ]
    assert first["recipients"][1]["curve"] == "P-256"
    assert first["openedBy"] == [str(KEYS / "ec256-sec1.pem")]
    assert second["openedBy"] == [str(KEYS / "ec384-pkcs8.pem")]
    assert third["encrypted"] is False and "openedBy" not in third
    text = ok(encoder("layerinfo", f"oci:{tmp_path / 'enc2'}")).stdout
    assert f"jwe: RSA-OAEP kid {rsa_kid}" in text
    assert "not encrypted" in text
    assert "platform linux/amd64" in text


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_LAYER_ROW = re.compile(
    r"^ +(\d+)  (sha256:[0-9a-f]{64}) +(\d+(?:\.\d)?) (B|KiB|MiB|GiB)  (\S+)$"
)
_PLATFORM_ROW = re.compile(r"^platform (\S+), manifest (sha256:[0-9a-f]{64})$")


Row = tuple[int, str, float, str, str]  # index, digest, size, unit, media type


def parse_layerinfo_text(text: str) -> list[tuple[str, str, list[Row]]]:
    """(platform, manifest digest, layer rows) per platform section of layerinfo's table."""
    sections: list[tuple[str, str, list[Row]]] = []
    for line in text.splitlines():
        if platform := _PLATFORM_ROW.match(line):
            sections.append((platform[1], platform[2], []))
        elif row := _LAYER_ROW.match(line):
            sections[-1][2].append((int(row[1]), row[2], float(row[3]), row[4], row[5]))
    return sections


def assert_size_shown(value: float, unit: str, size: int) -> None:
    if unit == "B":
        assert value == size
    else:
        assert abs(value * _UNITS[unit] - size) <= 0.05 * _UNITS[unit], (value, unit, size)
        assert size >= _UNITS[unit] and value < 1024, "the largest unit that fits"


def test_layerinfo_rows_match_the_manifests(encoder: Encoder, tmp_path: Path) -> None:
    builder = LayoutBuilder(tmp_path / "src")
    amd64 = builder.manifest([Layer(os.urandom(700), GZIP), Layer(os.urandom(5000), ZSTD),
                              Layer(os.urandom(3 << 20), TAR), Layer(os.urandom(1500), GZIP)])
    arm64 = builder.manifest([Layer(os.urandom(90_000), GZIP), Layer(os.urandom(200), GZIP),
                              Layer(os.urandom(2 << 20), ZSTD)], arch="arm64")
    builder.add(builder.index([(amd64, "linux/amd64"), (arm64, "linux/arm64")]), "multi")
    ok(encoder("encrypt", "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}", "--layer", "0",
               "--layer", "2", f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"))
    out = Reader(tmp_path / "enc")
    entry = out.entry("multi")
    children = out.json(entry["digest"])["manifests"]
    expected = [
        (f"{c['platform']['os']}/{c['platform']['architecture']}", c["digest"],
         out.json(c["digest"])["layers"])
        for c in children
    ]
    assert [la["mediaType"] for la in expected[0][2]] == [
        GZIP + "+encrypted", ZSTD, TAR + "+encrypted", GZIP]
    assert [la["mediaType"] for la in expected[1][2]] == [
        GZIP + "+encrypted", GZIP, ZSTD + "+encrypted"]

    info = json.loads(ok(encoder("layerinfo", "--json", f"oci:{tmp_path / 'enc'}")).stdout)
    assert info["digest"] == entry["digest"]
    assert [(m["platform"], m["manifest"]) for m in info["manifests"]] == [
        (platform, digest_) for platform, digest_, _ in expected]
    for manifest, (_, _, layers) in zip(info["manifests"], expected, strict=True):
        assert [(la["index"], la["digest"], la["size"], la["mediaType"])
                for la in manifest["layers"]] == [
            (i, la["digest"], la["size"], la["mediaType"]) for i, la in enumerate(layers)]
        assert [la["encrypted"] for la in manifest["layers"]] == [
            la["mediaType"].endswith("+encrypted") for la in layers]

    text = ok(encoder("layerinfo", f"oci:{tmp_path / 'enc'}")).stdout
    assert text.splitlines()[0] == f"oci:{tmp_path / 'enc'} ({entry['digest']})"
    sections = parse_layerinfo_text(text)
    assert [(p, d) for p, d, _ in sections] == [(p, d) for p, d, _ in expected]
    for (_, _, rows), (_, _, layers) in zip(sections, expected, strict=True):
        assert [(i, d, t) for i, d, _, _, t in rows] == [
            (i, la["digest"], la["mediaType"]) for i, la in enumerate(layers)]
        for (_, _, value, unit, _), layer in zip(rows, layers, strict=True):
            assert_size_shown(value, unit, layer["size"])
    assert {unit for _, _, rows in sections for *_, unit, _ in rows} == {"B", "KiB", "MiB"}


def test_layerinfo_on_a_skopeo_layer_has_no_kid(encoder: Encoder, tmp_path: Path) -> None:
    fixture_layout(tmp_path / "src", "two-recipients")
    text = ok(encoder("layerinfo", "--key", KEYS / "rsa2048-pkcs8.pem",
                      f"oci:{tmp_path / 'src'}")).stdout
    assert "jwe: RSA-OAEP (no kid)" in text
    assert "jwe: ECDH-ES+A256KW P-384 (no kid)" in text
    assert f"opened by: {KEYS / 'rsa2048-pkcs8.pem'}" in text


def test_layerinfo_platform_filter(encoder: Encoder, tmp_path: Path) -> None:
    two_platform_image(tmp_path / "src")
    info = json.loads(ok(encoder("layerinfo", "--json", "--platform", "linux/arm64",
                                 f"oci:{tmp_path / 'src'}:multi")).stdout)
    assert [m["platform"] for m in info["manifests"]] == ["linux/arm64"]


# --- the program --------------------------------------------------------------------------


def test_progress_line_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = io.StringIO(), Terminal()
    reporter = encode_cli.TerminalReporter(out, err)
    reporter.DELAY = 0
    update = reporter.start("encrypting layer 0 of linux/amd64", 4 << 20)
    assert update is not None
    update(2 << 20)
    reporter.finish()
    assert "\rencrypting layer 0 of linux/amd64:  50% of 4 MiB" in err.getvalue()
    assert err.getvalue().endswith("\r\x1b[K")
    plain = encode_cli.TerminalReporter(io.StringIO(), io.StringIO())
    assert plain.start("x", 1 << 30) is None
    terminal = Terminal()
    hostile = encode_cli.TerminalReporter(io.StringIO(), terminal)
    hostile.DELAY = 0
    draw = hostile.start("layer 0 of linux\x1b]0;title\x07\x1b[2J", 1 << 20)
    assert draw is not None
    draw(1 << 20)
    drawn = terminal.getvalue()
    assert "\x07" not in drawn and "\x1b]" not in drawn and "\x1b[2J" not in drawn
    assert "linux\\x1b]0;title\\x07\\x1b[2J: 100%" in drawn


# ctd-encoder's own main(), with the half-second before the first draw removed, so that a
# small layer is enough; everything else (isatty, the reporter, the encrypt path) is as run.
_ENCODER_WITHOUT_DELAY = (
    "import sys; from decoder import encode_cli; encode_cli.TerminalReporter.DELAY = 0.0; "
    "sys.exit(encode_cli.main(sys.argv[1:]))"
)
_PROGRESS = re.compile(
    r"\rencrypting layer 0 of linux/amd64: +(\d+)% of 3 MiB, \d+ MiB/s\x1b\[K"
)


def encrypt_command(tmp_path: Path) -> list[str]:
    simple_image(tmp_path / "src", [Layer(os.urandom(3 << 20))])
    return [sys.executable, "-c", _ENCODER_WITHOUT_DELAY, "encrypt",
            "--recipient", f"jwe:{KEYS / 'ec256.pub.pem'}",
            f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'dst'}"]


def test_encrypt_draws_progress_when_stderr_is_a_terminal(tmp_path: Path) -> None:
    import threading

    command = encrypt_command(tmp_path)
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=slave)
    finally:
        os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        reader.join(timeout=30)
        os.close(master)
    terminal = b"".join(chunks).decode()
    assert proc.returncode == 0, terminal
    percents = [int(p) for p in _PROGRESS.findall(terminal)]
    assert percents and percents[-1] == 100, repr(terminal)
    assert percents == sorted(percents)
    assert terminal.endswith("\r\x1b[K"), "the line is cleared when the layer is done"
    assert "\n" not in terminal, "progress stays on one line"
    assert "encrypting" not in stdout.decode()
    assert "layer 0: " in stdout.decode() and "wrote oci:" in stdout.decode()


def test_encrypt_draws_no_progress_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    command = encrypt_command(tmp_path)
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert "layer 0: " in result.stdout and "wrote oci:" in result.stdout
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    Reader(tmp_path / "dst").check_complete()


def test_console_script_help_version_and_errors(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("ctd-encoder")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, check=False)
    assert version.returncode == 0 and version.stdout.startswith("ctd-encoder ")
    help_text = subprocess.run([script, "encrypt", "--help"], capture_output=True, text=True,
                               check=False).stdout
    assert "jwe:FILE" in help_text and "pkcs7:CERT" in help_text
    bad = subprocess.run([script, "frobnicate"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("ctd-encoder: ")


def test_the_decoder_never_imports_the_encoder() -> None:
    """ctd-decoder's start-up and decode path stay free of the encoder's modules."""
    code = (
        "import sys; import decoder.cli, decoder.decode, decoder.keywrap.jwe, decoder.keys; "
        "print(sorted(m for m in sys.modules if m.startswith('decoder')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    for module in ("decoder.encode", "decoder.encode_cli", "decoder.ocilayout"):
        assert f"'{module}'" not in out
    assert "'decoder.decode'" in out


def test_pkcs7_recipient_needs_an_rsa_certificate(encoder: Encoder, tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec recipient")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    path = tmp_path / "ec.cert.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    simple_image(tmp_path / "src", random_layers(1))
    refused(encoder("encrypt", "--recipient", f"pkcs7:{path}", f"oci:{tmp_path / 'src'}",
                    f"oci:{tmp_path / 'dst'}"), "must hold an RSA key")
    # the same certificate is a fine JWE recipient (its EC key)
    ok(encoder("encrypt", "--recipient", f"jwe:{path}", f"oci:{tmp_path / 'src'}",
               f"oci:{tmp_path / 'dst'}"))

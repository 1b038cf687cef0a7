"""ctd-encoder against the real tools: skopeo 1.9.3 both ways, the Go ocicrypt reference
decoder (refdec), and containerd's CRI plugin with our ctd-decoder.

Owns the encoder's interoperability. Each case starts from plain images built with umoci
(busybox plus a unique marker), encrypts them with one tool and decrypts them with the other,
and compares layer digests with the originals: decryption must give back the very blobs that
were encrypted. The only exception is skopeo's own encryption of an uncompressed layer, which
it gzips while recording the tar's digest (README, "Digest mismatch").
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import pytest
from test_cri_pull import assert_pulls

pytestmark = pytest.mark.integration

ENCRYPTED = "+encrypted"
KEY_CASES = {
    "rsa2048": ("rsa", "pkcs8-pem"),
    "rsa4096": ("rsa4096", "pkcs8-pem"),
    "ec-p256": ("ec-p256", "pkcs8-pem"),
    "ec-p384": ("ec-p384", "pkcs8-pem"),
    "ec-p521": ("ec-p521", "pkcs8-pem"),
}


@pytest.fixture(scope="session")
def refdec() -> Path:
    """The Go reference decoder, built into the cache when missing (a failure, never a skip)."""
    try:
        return harness.refdec_program()
    except harness.HarnessError as e:
        pytest.fail(f"the Go ocicrypt reference decoder cannot be had: {e}")


@pytest.fixture(scope="session")
def images(materials: harness.Materials) -> Callable[[str], harness.LocalImage]:
    """Plain source images by shape, each built once: gzip (umoci's), zstd, tar (uncompressed),
    two-layer, arm64 (a gzip image whose config says arm64)."""

    def image(shape: str) -> harness.LocalImage:
        def build(directory: Path) -> harness.LocalImage:
            layers = [{"/marker": harness.unique_marker(f"encoder {shape}")}]
            if shape == "two-layer":
                layers.append({"/top/marker": harness.unique_marker("encoder top layer")})
            local = harness.build_image(directory, "image", layers)
            if shape == "zstd":
                return harness.recompress_zstd(local, directory)
            if shape == "tar":
                return harness.decompress_layers(local, directory)
            if shape == "arm64":
                return harness.with_architecture(local, directory, "arm64")
            return local

        return materials.cached(f"encoder-image-{shape}", build)

    return image


def key_of(materials: harness.Materials, case: str) -> harness.KeyPair:
    algorithm, fmt = KEY_CASES[case]
    return materials.key(f"encoder-{case}", algorithm, fmt)


def key_file(key: harness.KeyPair, directory: Path) -> Path:
    """The private key alone in a directory of its own (for --key, skopeo and refdec)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / key.key_file
    path.write_bytes(key.key_bytes)
    path.chmod(0o600)
    return path


def originals(image: harness.LocalImage, work: Path) -> dict[str, list[str]]:
    return harness.layer_digests(image.source, work)


def skopeo_decrypts(
    work: Path, location: str, keys: list[Path], expected: dict[str, list[str]]
) -> None:
    """skopeo copy --decryption-key ... gives back layers with the original digests."""
    out = f"oci:{work / ('skopeo-decrypted-' + uuid.uuid4().hex[:8])}:t"
    args: list[str | Path] = ["--all"]
    for key in keys:
        args += ["--decryption-key", key]
    harness.skopeo_copy(work, *args, location, out)
    assert harness.layer_digests(out, work) == expected


def encrypted_layers(location: str, work: Path) -> list[tuple[Path, dict[str, Any], int]]:
    """(blob path, descriptor, index) of every encrypted layer of an oci: image."""
    layout = Path(location.split(":")[1])
    found = []
    for manifest in harness.layout_manifests(location, work).values():
        for index, layer in enumerate(manifest["layers"]):
            if layer["mediaType"].endswith(ENCRYPTED):
                path = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
                found.append((path, layer, index))
    return found


def reference_decrypts(
    program: Path, location: str, key: Path, expected: list[str], work: Path,
    parameters: dict[str, list[str]] | None = None,
) -> None:
    """Every encrypted layer decrypts with `program` (refdec or ctd-decoder) to a blob whose
    digest is the original layer's at the same index."""
    layers = encrypted_layers(location, work)
    assert layers
    for blob, descriptor, index in layers:
        result = harness.decode_layer(program, blob, descriptor, key.parent, parameters)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert "sha256:" + hashlib.sha256(result.stdout).hexdigest() == expected[index]


def media_types(location: str, work: Path) -> dict[str, list[str]]:
    return {p: [la["mediaType"] for la in m["layers"]]
            for p, m in harness.layout_manifests(location, work).items()}


# --- both ways, per key type ----------------------------------------------------------------


@pytest.mark.parametrize("case", KEY_CASES)
def test_ours_to_skopeo_and_go_ocicrypt(
    case: str, materials: harness.Materials, images: Callable[[str], harness.LocalImage],
    refdec: Path, tmp_path: Path,
) -> None:
    key = key_of(materials, case)
    private = key_file(key, tmp_path / "keys")
    image = images("gzip")
    expected = originals(image, tmp_path)
    encrypted = f"oci:{tmp_path / 'enc'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", image.source, encrypted)
    assert media_types(encrypted, tmp_path) == {
        "linux/amd64": ["application/vnd.oci.image.layer.v1.tar+gzip+encrypted"]}
    skopeo_decrypts(tmp_path, encrypted, [private], expected)
    reference_decrypts(refdec, encrypted, private, expected["linux/amd64"], tmp_path)
    reference_decrypts(harness.pip_decoder(), encrypted, private, expected["linux/amd64"],
                       tmp_path)


@pytest.mark.parametrize("case", KEY_CASES)
def test_skopeo_to_ours(
    case: str, materials: harness.Materials, images: Callable[[str], harness.LocalImage],
    tmp_path: Path,
) -> None:
    key = key_of(materials, case)
    image = images("gzip")
    encrypted = f"oci:{tmp_path / 'enc'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{key.public_pem}", image.source,
                        encrypted)
    decrypted = f"oci:{tmp_path / 'dec'}:t"
    harness.encoder("decrypt", "--key", key_file(key, tmp_path / "keys"), encrypted, decrypted)
    assert harness.layer_digests(decrypted, tmp_path) == originals(image, tmp_path)
    assert media_types(decrypted, tmp_path) == media_types(image.source, tmp_path)


def test_two_recipients_each_key_alone(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], refdec: Path,
    tmp_path: Path,
) -> None:
    rsa, ec = key_of(materials, "rsa2048"), key_of(materials, "ec-p256")
    rsa_file, ec_file = key_file(rsa, tmp_path / "rsa"), key_file(ec, tmp_path / "ec")
    image = images("gzip")
    expected = originals(image, tmp_path)
    ours = f"oci:{tmp_path / 'ours'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{rsa.public_pem}",
                    "--recipient", f"jwe:{ec.public_pem}", image.source, ours)
    for private in (rsa_file, ec_file):
        skopeo_decrypts(tmp_path, ours, [private], expected)
        reference_decrypts(refdec, ours, private, expected["linux/amd64"], tmp_path)
    theirs = f"oci:{tmp_path / 'theirs'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{rsa.public_pem}",
                        "--encryption-key", f"jwe:{ec.public_pem}", image.source, theirs)
    for name, private in (("rsa", rsa_file), ("ec", ec_file)):
        decrypted = f"oci:{tmp_path / ('dec-' + name)}:t"
        harness.encoder("decrypt", "--key", private, theirs, decrypted)
        assert harness.layer_digests(decrypted, tmp_path) == expected


def test_pkcs7_both_ways(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], refdec: Path,
    tmp_path: Path,
) -> None:
    key = key_of(materials, "rsa2048")
    private = key_file(key, tmp_path / "keys")
    certificate = harness.make_certificate(key, tmp_path / "cert")
    image = images("gzip")
    expected = originals(image, tmp_path)
    ours = f"oci:{tmp_path / 'ours'}:t"
    harness.encoder("encrypt", "--recipient", f"pkcs7:{certificate}", image.source, ours)
    (_, descriptor, _), = encrypted_layers(ours, tmp_path)
    assert list(descriptor["annotations"]) == ["org.opencontainers.image.enc.keys.pkcs7",
                                               "org.opencontainers.image.enc.pubopts"]
    skopeo_decrypts(tmp_path, ours, [private, certificate], expected)
    # Go ocicrypt's pkcs7 unwrap takes the certificate from the payload's x509s
    x509s = {"x509s": [base64.b64encode(certificate.read_bytes()).decode()]}
    reference_decrypts(refdec, ours, private, expected["linux/amd64"], tmp_path, x509s)
    theirs = f"oci:{tmp_path / 'theirs'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"pkcs7:{certificate}", image.source,
                        theirs)
    decrypted = f"oci:{tmp_path / 'dec'}:t"
    harness.encoder("decrypt", "--key", private, "--key", certificate, theirs, decrypted)
    assert harness.layer_digests(decrypted, tmp_path) == expected


# --- image shapes ---------------------------------------------------------------------------

SHAPE_TYPES = {
    "zstd": ["application/vnd.oci.image.layer.v1.tar+zstd+encrypted"],
    "tar": ["application/vnd.oci.image.layer.v1.tar+encrypted"],
    "two-layer": ["application/vnd.oci.image.layer.v1.tar+gzip+encrypted"] * 2,
}


@pytest.mark.parametrize("shape", SHAPE_TYPES)
def test_shapes_ours_to_skopeo_and_go_ocicrypt(
    shape: str, materials: harness.Materials, images: Callable[[str], harness.LocalImage],
    refdec: Path, tmp_path: Path,
) -> None:
    key = key_of(materials, "ec-p384")
    private = key_file(key, tmp_path / "keys")
    image = images(shape)
    expected = originals(image, tmp_path)
    encrypted = f"oci:{tmp_path / 'enc'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", image.source, encrypted)
    assert media_types(encrypted, tmp_path) == {"linux/amd64": SHAPE_TYPES[shape]}
    skopeo_decrypts(tmp_path, encrypted, [private], expected)
    reference_decrypts(refdec, encrypted, private, expected["linux/amd64"], tmp_path)


@pytest.mark.parametrize("shape", ["zstd", "two-layer"])
def test_shapes_skopeo_to_ours(
    shape: str, materials: harness.Materials, images: Callable[[str], harness.LocalImage],
    tmp_path: Path,
) -> None:
    key = key_of(materials, "ec-p384")
    image = images(shape)
    encrypted = f"oci:{tmp_path / 'enc'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{key.public_pem}", image.source,
                        encrypted)
    assert media_types(encrypted, tmp_path) == {"linux/amd64": SHAPE_TYPES[shape]}
    decrypted = f"oci:{tmp_path / 'dec'}:t"
    harness.encoder("decrypt", "--key", key_file(key, tmp_path / "keys"), encrypted, decrypted)
    assert harness.layer_digests(decrypted, tmp_path) == originals(image, tmp_path)


def test_skopeo_encrypted_uncompressed_layer(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], tmp_path: Path,
) -> None:
    """skopeo gzips an uncompressed layer while encrypting it and records the tar's digest:
    our decrypt refuses by default, and with --accept-digest-mismatch writes the gzip blob,
    whose content is the original tar."""
    key = key_of(materials, "ec-p384")
    private = key_file(key, tmp_path / "keys")
    image = images("tar")
    encrypted = f"oci:{tmp_path / 'enc'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{key.public_pem}", image.source,
                        encrypted)
    assert media_types(encrypted, tmp_path) == {
        "linux/amd64": ["application/vnd.oci.image.layer.v1.tar+gzip+encrypted"]}
    decrypted = f"oci:{tmp_path / 'dec'}:t"
    refused = harness.encoder("decrypt", "--key", private, encrypted, decrypted, check=False)
    assert refused.returncode == 1
    assert "does not match the digest in its private options" in refused.stderr
    assert "--accept-digest-mismatch" in refused.stderr
    assert not (tmp_path / "dec").exists()
    harness.encoder("decrypt", "--key", private, "--accept-digest-mismatch", encrypted,
                    decrypted)
    (layer,) = harness.layout_manifests(decrypted, tmp_path)["linux/amd64"]["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    tar = gzip.decompress(harness.layout_blob(tmp_path / "dec", layer["digest"]))
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == image.diff_ids[0]


def test_top_layer_only(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], refdec: Path,
    tmp_path: Path,
) -> None:
    key = key_of(materials, "rsa2048")
    private = key_file(key, tmp_path / "keys")
    image = images("two-layer")
    expected = originals(image, tmp_path)
    ours = f"oci:{tmp_path / 'ours'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", "--layer", "-1",
                    image.source, ours)
    digests = harness.layer_digests(ours, tmp_path)["linux/amd64"]
    assert digests[0] == expected["linux/amd64"][0]
    assert media_types(ours, tmp_path)["linux/amd64"][1].endswith(ENCRYPTED)
    skopeo_decrypts(tmp_path, ours, [private], expected)
    reference_decrypts(refdec, ours, private, expected["linux/amd64"], tmp_path)
    theirs = f"oci:{tmp_path / 'theirs'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{key.public_pem}",
                        "--encrypt-layer", "-1", image.source, theirs)
    assert harness.layer_digests(theirs, tmp_path)["linux/amd64"][0] == digests[0]
    decrypted = f"oci:{tmp_path / 'dec'}:t"
    harness.encoder("decrypt", "--key", private, theirs, decrypted)
    assert harness.layer_digests(decrypted, tmp_path) == expected


def test_adding_a_recipient_to_an_image_skopeo_encrypted(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], refdec: Path,
    tmp_path: Path,
) -> None:
    first, second = key_of(materials, "rsa2048"), key_of(materials, "ec-p521")
    first_file, second_file = key_file(first, tmp_path / "a"), key_file(second, tmp_path / "b")
    image = images("two-layer")
    expected = originals(image, tmp_path)
    theirs = f"oci:{tmp_path / 'theirs'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{first.public_pem}", image.source,
                        theirs)
    missing_key = harness.encoder("encrypt", "--recipient", f"jwe:{second.public_pem}", theirs,
                                  f"oci:{tmp_path / 'nokey'}:t", check=False)
    assert missing_key.returncode == 1 and "needs --key" in missing_key.stderr
    added = f"oci:{tmp_path / 'added'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{second.public_pem}", "--key", first_file,
                    theirs, added)
    assert harness.layer_digests(added, tmp_path) == harness.layer_digests(theirs, tmp_path)
    for private in (second_file, first_file):
        skopeo_decrypts(tmp_path, added, [private], expected)
    reference_decrypts(refdec, added, second_file, expected["linux/amd64"], tmp_path)
    info = json.loads(harness.encoder("layerinfo", "--json", "--key", second_file, added).stdout)
    for layer in info["manifests"][0]["layers"]:
        assert layer["openedBy"] == [str(second_file)]
        assert [r.get("kid") is not None for r in layer["recipients"]] == [False, True]


def test_two_platform_index_with_platform(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], refdec: Path,
    tmp_path: Path,
) -> None:
    key = key_of(materials, "ec-p256")
    private = key_file(key, tmp_path / "keys")
    layout = materials.cached("encoder-multi", lambda d: harness.multi_platform_image(
        {"linux/amd64": images("gzip"), "linux/arm64": images("arm64")}, d))
    source = f"oci:{layout}:multi"
    expected = harness.layer_digests(source, tmp_path)
    assert sorted(expected) == ["linux/amd64", "linux/arm64"]
    before = harness.layout_manifests(source, tmp_path)
    ours = f"oci:{tmp_path / 'ours'}:multi"
    harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", "--platform",
                    "linux/arm64", source, ours)
    after = harness.layout_manifests(ours, tmp_path)
    assert after["linux/amd64"]["x-digest"] == before["linux/amd64"]["x-digest"]
    assert all(la["mediaType"].endswith(ENCRYPTED) for la in after["linux/arm64"]["layers"])
    skopeo_decrypts(tmp_path, ours, [private], expected)
    reference_decrypts(refdec, ours, private, expected["linux/arm64"], tmp_path)
    theirs = f"oci:{tmp_path / 'theirs'}:multi"
    harness.skopeo_copy(tmp_path, "--all", "--encryption-key", f"jwe:{key.public_pem}", source,
                        theirs)
    partly = f"oci:{tmp_path / 'partly'}:multi"
    harness.encoder("decrypt", "--key", private, "--platform", "linux/arm64", theirs, partly)
    digests = harness.layer_digests(partly, tmp_path)
    assert digests["linux/arm64"] == expected["linux/arm64"]
    assert digests["linux/amd64"] == harness.layer_digests(theirs, tmp_path)["linux/amd64"]
    decrypted = f"oci:{tmp_path / 'dec'}:multi"
    harness.encoder("decrypt", "--key", private, theirs, decrypted)
    assert harness.layer_digests(decrypted, tmp_path) == expected


def test_oci_archive_in_and_out(
    materials: harness.Materials, images: Callable[[str], harness.LocalImage], tmp_path: Path,
) -> None:
    key = key_of(materials, "rsa2048")
    private = key_file(key, tmp_path / "keys")
    image = images("two-layer")
    expected = originals(image, tmp_path)
    archive = f"oci-archive:{tmp_path / 'plain.tar'}:t"
    harness.skopeo_copy(tmp_path, image.source, archive)
    ours = f"oci-archive:{tmp_path / 'ours.tar'}:t"
    harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", archive, ours)
    assert all(t.endswith(ENCRYPTED) for t in media_types(ours, tmp_path)["linux/amd64"])
    skopeo_decrypts(tmp_path, ours, [private], expected)
    theirs = f"oci-archive:{tmp_path / 'theirs.tar'}:t"
    harness.skopeo_copy(tmp_path, "--encryption-key", f"jwe:{key.public_pem}", image.source,
                        theirs)
    decrypted = f"oci-archive:{tmp_path / 'dec.tar'}:t"
    harness.encoder("decrypt", "--key", private, theirs, decrypted)
    again = f"oci:{tmp_path / 'again'}:t"
    harness.skopeo_copy(tmp_path, decrypted, again)  # skopeo reads the archive we wrote
    assert harness.layer_digests(again, tmp_path) == expected


# --- containerd ---------------------------------------------------------------------------


def test_cri_pull_of_an_image_we_encrypted(
    keys: harness.Node, materials: harness.Materials, tmp_path: Path
) -> None:
    """Encrypted with ctd-encoder, pushed with skopeo, pulled through CRI with our decoder,
    run in a container."""
    key = materials.key("encoder-cri", "ec-p256", "sec1-pem")

    def build(directory: Path) -> tuple[harness.LocalImage, Path]:
        local = harness.build_image(directory, "image", [
            {"/marker": harness.unique_marker("encoder cri")},
            {"/top/marker": harness.unique_marker("encoder cri top")},
        ])
        encrypted = directory / "encrypted.oci"
        harness.encoder("encrypt", "--recipient", f"jwe:{key.public_pem}", local.source,
                        f"oci:{encrypted}:{local.tag}")
        return local, encrypted

    local, encrypted = materials.cached("encoder-cri-image", build)
    pushed = harness.push_layout(f"oci:{encrypted}:{local.tag}", materials.registry,
                                 "pyimgcrypt/encoder-cri", local, tmp_path)
    assert pushed.layer_media_types == [harness.GZIP_ENCRYPTED] * 2
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, pushed)

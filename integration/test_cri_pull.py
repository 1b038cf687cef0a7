"""End-to-end cases: encrypted images pulled through containerd's CRI plugin with our decoder.

Owns the behaviour a node operator sees. Every case pushes its own image (unique marker files,
so its layers are new to containerd and must really be decrypted), puts the case's keys in the
node's key directories, pulls with CRI PullImage, and then checks the unpacked files with
`ctr images mount` and by running a container that prints them. Each case runs once per
decoder variant (see conftest.py).
"""

from __future__ import annotations

import base64
import json
import tomllib
from pathlib import Path

import harness
import pytest
from harness import PullFailed

pytestmark = pytest.mark.integration


def assert_pulls(node: harness.Node, image: harness.PushedImage) -> None:
    """Pull through CRI and prove the layers were decrypted and unpacked correctly."""
    snapshots = node.snapshots()
    assert not set(image.chain_ids) & snapshots, (
        "the image's layers are already unpacked on this node, so a pull would not decrypt"
    )
    image_id = node.pull(image.ref)
    assert image_id == image.local.config_digest
    assert image.ref in node.image_refs()
    assert set(image.chain_ids) <= node.snapshots(), "CRI did not unpack every layer"
    paths = list(image.local.markers)
    assert node.read_image_files(image.ref, paths) == image.local.markers
    output = node.run_container(image.ref, ["/bin/busybox", "cat", *paths])
    assert output == "".join(image.local.markers[p] for p in paths)


def assert_refused(node: harness.Node, image: harness.PushedImage) -> str:
    """Pull through CRI, expect our no-key failure, and prove nothing was unpacked or stored.

    Refusals where containerd lost the decoder's message to its exit-status race are retried
    (see harness.pull_expecting_refusal); every attempt must leave the node unchanged.
    """
    snapshots = node.snapshots()
    refs = node.image_refs()
    errors = harness.pull_expecting_refusal(node, image)
    assert node.snapshots() == snapshots, "a failed pull left snapshots behind"
    assert not set(image.chain_ids) & node.snapshots()
    assert node.image_refs() == refs
    assert image.ref not in refs
    assert image.local.config_digest not in refs
    details = errors[-1]
    first_layer = image.layer_digests[0]
    assert f"{harness.DECODER_MESSAGE_PREFIX}{harness.NO_KEY_MESSAGE}{first_layer};" in details
    return details


def only(files: dict[str, bytes], *names: str) -> dict[str, bytes]:
    return {name: files[name] for name in names}


# --- the node itself --------------------------------------------------------------------------


def test_node_runs_the_shipped_config(node: harness.Node) -> None:
    """containerd's effective config is config/containerd-1.x.toml with only the node's paths
    changed: same processor ids, media types and `returns`, the CRI image_decryption as
    shipped; the decoder under test, the node's key directories and no system path."""
    with harness.SHIPPED_CONFIG_1X.open("rb") as f:
        shipped = tomllib.load(f)
    dump = harness.run(["containerd", "--config", node.config_path, "config", "dump"]).stdout
    config = tomllib.loads(dump)
    processors = config["stream_processors"]
    assert set(processors) == set(shipped["stream_processors"])
    key_args = ["--decryption-keys-path", str(node.keys_dir),
                "--decryption-keys-path", str(node.extra_keys_dir)]
    for proc_id, want in shipped["stream_processors"].items():
        got = processors[proc_id]
        assert (got["accepts"], got["returns"]) == (want["accepts"], want["returns"]), proc_id
        assert got["path"] == str(node.decoder)
        assert want["args"] == ["--decryption-keys-path", harness.SHIPPED_KEYS_DIR]
        assert got["args"] == key_args
        # the key-provider config the shipped env names, moved into the node's directory
        assert got["env"] == [
            f"{name}={node.system_dir}{value}"
            for name, _, value in (entry.partition("=") for entry in want["env"])
        ]
    # the zstd arrangement: tar+zstd+encrypted goes to the tar.gzip id, the only one besides
    # ...v1.tar that containerd hands a payload to (test_zstd_layer pulls one)
    assert harness.ZSTD_ENCRYPTED in processors[harness.GZIP_PROCESSOR]["accepts"]
    assert harness.GZIP_ENCRYPTED in processors[harness.GZIP_PROCESSOR]["accepts"]
    assert harness.TAR_ENCRYPTED in processors[harness.TAR_PROCESSOR]["accepts"]
    for got in processors.values():
        for value in [*got["args"], *(entry.partition("=")[2] for entry in got["env"])]:
            assert not value.startswith(harness.SYSTEM_PATH_PREFIXES), value
    cri = config["plugins"][harness.CRI_PLUGIN]
    assert cri["image_decryption"] == shipped["plugins"][harness.CRI_PLUGIN]["image_decryption"]
    assert config["root"].startswith(str(node.directory))
    assert config["state"].startswith(str(node.directory))


def test_a_snippet_with_a_zstd_processor_id_fails_the_zstd_pull(
    materials: harness.Materials, registry: harness.Registry, work: Path
) -> None:
    """The suite notices a broken snippet: with the zstd types under their own
    ...v1.tar.zstd id (as imgcrypt's README has it), containerd runs the decoder without a
    payload and the zstd pull fails, where test_zstd_layer pulls it with the shipped one."""
    with harness.SHIPPED_CONFIG_1X.open("rb") as f:
        snippet = tomllib.load(f)
    processors = snippet["stream_processors"]
    gzip_processor = processors[harness.GZIP_PROCESSOR]
    zstd_types = [t for t in gzip_processor["accepts"] if "+zstd+" in t]
    assert harness.ZSTD_ENCRYPTED in zstd_types
    gzip_processor["accepts"] = [t for t in gzip_processor["accepts"] if t not in zstd_types]
    processors["io.containerd.ocicrypt.decoder.v1.tar.zstd"] = {
        **gzip_processor, "accepts": zstd_types,
        "returns": "application/vnd.oci.image.layer.v1.tar+zstd"}
    broken = work / "containerd-1.x-zstd-own-id.toml"
    broken.write_text(harness.toml_text(snippet))
    key = materials.key("zstd", "rsa", "pkcs8-pem")
    image = materials.image("zstd", [key.public_pem], source="zstd")
    assert image.layer_media_types == [harness.ZSTD_ENCRYPTED]
    with harness.Node(work / "node-zstd-own-id", harness.pip_decoder(), registry.host,
                      name="zstd-own-id", shipped_config=broken) as node:
        assert "io.containerd.ocicrypt.decoder.v1.tar.zstd" in node.config_text()
        harness.write_key_files(node.keys_dir, key.files)
        with pytest.raises(PullFailed) as failure:
            node.pull(image.ref)
        assert f"{harness.DECODER_MESSAGE_PREFIX}no decryption payload on fd 3" in \
            failure.value.details
        assert not set(image.chain_ids) & node.snapshots()


# --- key formats ------------------------------------------------------------------------------

KEY_CASES = [
    ("rsa", "pkcs1-pem", "PEM RSA PRIVATE KEY"),
    ("rsa", "pkcs8-pem", "PEM PRIVATE KEY"),
    ("rsa", "pkcs1-der", "DER starting 30"),
    ("rsa", "pkcs8-der", "DER starting 30"),
    ("ec-p256", "sec1-pem", "PEM EC PARAMETERS + EC PRIVATE KEY"),
    ("ec-p384", "sec1-pem", "PEM EC PARAMETERS + EC PRIVATE KEY"),
    ("ec-p521", "sec1-pem", "PEM EC PARAMETERS + EC PRIVATE KEY"),
    ("ec-p256", "pkcs8-pem", "PEM PRIVATE KEY"),
    ("ec-p384", "pkcs8-pem", "PEM PRIVATE KEY"),
    ("ec-p521", "pkcs8-pem", "PEM PRIVATE KEY"),
    ("ec-p256", "sec1-der", "DER starting 30"),
    ("ec-p384", "pkcs8-der", "DER starting 30"),
    ("rsa", "jwk", "JWK kty=RSA crv=None private=True"),
    ("ec-p521", "jwk", "JWK kty=EC crv=P-521 private=True"),
    ("rsa", "pkcs8-encrypted", "PEM ENCRYPTED PRIVATE KEY"),
    ("ec-p256", "pkcs8-encrypted", "PEM ENCRYPTED PRIVATE KEY"),
    ("rsa", "pkcs1-encrypted", "PEM RSA PRIVATE KEY (Proc-Type: 4,ENCRYPTED)"),
    ("rsa4096", "pkcs8-pem", "PEM PRIVATE KEY"),
    ("rsa4096", "pkcs1-pem", "PEM RSA PRIVATE KEY"),
]
ENCRYPTED_KEY_FORMATS = ["pkcs8-encrypted", "pkcs1-encrypted"]


@pytest.mark.parametrize(
    ("algorithm", "fmt", "looks_like"), KEY_CASES, ids=[f"{a}-{f}" for a, f, _ in KEY_CASES]
)
def test_key_format(
    keys: harness.Node, materials: harness.Materials, algorithm: str, fmt: str, looks_like: str
) -> None:
    """A node whose only key is in this format pulls an image encrypted for it."""
    key = materials.key(f"{algorithm}-{fmt}", algorithm, fmt)
    assert harness.describe_key_file(key.key_bytes) == looks_like
    if algorithm in harness.RSA_SIZES:
        bits = harness.RSA_SIZES[algorithm]
        assert f"({bits} bit)" in harness.public_key_text(key.public_pem).splitlines()[0]
    if fmt in ENCRYPTED_KEY_FORMATS:
        assert key.key_file + ".password" in key.files
    image = materials.image(f"{algorithm}-{fmt}", [key.public_pem])
    assert image.layer_media_types == [harness.GZIP_ENCRYPTED]
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


@pytest.mark.parametrize("fmt", ENCRYPTED_KEY_FORMATS)
def test_encrypted_key_without_its_password_file_is_refused(
    keys: harness.Node, materials: harness.Materials, fmt: str
) -> None:
    """Without KEY.password the encrypted key is unusable, and the message says what to do."""
    key = materials.key(f"rsa-{fmt}", "rsa", fmt)
    image = materials.image(f"{fmt}-key-without-password", [key.public_pem])
    harness.write_key_files(keys.keys_dir, only(key.files, key.key_file))
    details = assert_refused(keys, image)
    assert ".password" in details
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


# --- image shapes -----------------------------------------------------------------------------


def test_two_layer_image(keys: harness.Node, materials: harness.Materials) -> None:
    """Each encrypted layer is decrypted by its own decoder run; both end up in the rootfs."""
    key = materials.key("two-layer", "ec-p384", "pkcs8-pem")
    image = materials.image("two-layer", [key.public_pem], layers=2)
    assert image.layer_media_types == [harness.GZIP_ENCRYPTED] * 2
    assert len(image.chain_ids) == 2
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


def test_zstd_layer(keys: harness.Node, materials: harness.Materials) -> None:
    """tar+zstd+encrypted reaches our decoder (with its payload) through the tar.gzip id."""
    key = materials.key("zstd", "rsa", "pkcs8-pem")
    image = materials.image("zstd", [key.public_pem], source="zstd")
    assert image.local.layer_media_types == ["application/vnd.oci.image.layer.v1.tar+zstd"]
    assert image.layer_media_types == [harness.ZSTD_ENCRYPTED]
    # A wrong key first: the refusal names the layer, which the decoder only knows from the
    # fd-3 payload, so containerd ran our decoder for this zstd layer with its payload.
    other = materials.key("zstd-other", "rsa", "pkcs8-pem")
    harness.write_key_files(keys.keys_dir, other.files)
    assert_refused(keys, image)
    keys.clear_keys()
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


def test_uncompressed_layer(keys: harness.Node, materials: harness.Materials) -> None:
    """tar+encrypted (ctd-encoder keeps an uncompressed layer uncompressed; skopeo would gzip
    it) reaches our decoder with its payload through the ...v1.tar id and unpacks as a tar."""
    key = materials.key("tar", "ec-p256", "pkcs8-pem")
    image = materials.image("tar", [key.public_pem], source="tar", encrypter="ctd-encoder")
    assert image.local.layer_media_types == ["application/vnd.oci.image.layer.v1.tar"]
    assert image.layer_media_types == [harness.TAR_ENCRYPTED]
    processors = keys.config()["stream_processors"]
    assert [pid for pid, p in processors.items() if harness.TAR_ENCRYPTED in p["accepts"]] == [
        harness.TAR_PROCESSOR]
    assert processors[harness.TAR_PROCESSOR]["returns"] == "application/vnd.oci.image.layer.v1.tar"
    # what the registry holds is ciphertext, neither the tar nor a gzip of it
    repository = image.ref.split("/", 1)[1].rsplit(":", 1)[0]
    status, blob = materials.registry.get(f"/v2/{repository}/blobs/{image.layer_digests[0]}")
    assert status == 200
    assert blob[257:262] != b"ustar" and blob[:2] != b"\x1f\x8b"
    # a wrong key first: the refusal names the layer, known to the decoder only from the fd-3
    # payload, so containerd ran it for this layer with its payload
    other = materials.key("tar-other", "ec-p256", "pkcs8-pem")
    harness.write_key_files(keys.keys_dir, other.files)
    assert_refused(keys, image)
    keys.clear_keys()
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


# --- layers skopeo recompressed while encrypting ----------------------------------------------
# skopeo writes the digest of the blob it was given into the layer's private options, and then
# recompresses the layer while encrypting it (an uncompressed source is always gzipped;
# --dest-compress-format changes the compression). The decoder refuses the digest mismatch by
# default and accepts it with --accept-digest-mismatch (README, "Digest mismatch").

RECOMPRESSED_CASES = ["zstd-while-encrypting", "uncompressed-source"]


def recompressed_image(
    materials: harness.Materials, case: str
) -> tuple[harness.KeyPair, harness.PushedImage]:
    key = materials.key(f"recompressed-{case}", "rsa", "pkcs8-pem")
    if case == "zstd-while-encrypting":
        # skopeo copy --dest-compress-format zstd --dest-compress --encryption-key jwe:...
        image = materials.image(f"recompressed-{case}", [key.public_pem],
                                zstd_while_encrypting=True)
        assert image.local.layer_media_types == ["application/vnd.oci.image.layer.v1.tar+gzip"]
        assert image.layer_media_types == [harness.ZSTD_ENCRYPTED]
    else:
        image = materials.image(f"recompressed-{case}", [key.public_pem], source="tar")
        assert image.local.layer_media_types == ["application/vnd.oci.image.layer.v1.tar"]
        assert image.layer_media_types == [harness.GZIP_ENCRYPTED]
    return key, image


@pytest.mark.parametrize("case", RECOMPRESSED_CASES)
def test_recompressed_layer_is_refused_by_default(
    keys: harness.Node, materials: harness.Materials, case: str
) -> None:
    """The pull fails and leaves nothing behind; the decoder's message explains the mismatch."""
    key, image = recompressed_image(materials, case)
    harness.write_key_files(keys.keys_dir, key.files)
    snapshots = keys.snapshots()
    with pytest.raises(PullFailed) as failure:
        keys.pull(image.ref)
    # containerd extracts the released (truncated) plaintext first and fails on its end before
    # it looks at the decoder's exit status, so the CRI error is the decompressor's EOF
    details = failure.value.details
    assert "unexpected EOF" in details or "does not match the sha256 digest" in details, details
    assert keys.snapshots() == snapshots
    assert image.ref not in keys.image_refs()
    # what the decoder says, run by hand exactly as containerd runs it
    result = harness.decode_directly(keys.decoder, materials.registry, image, [keys.keys_dir])
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1
    assert stderr.startswith(harness.DECODER_MESSAGE_PREFIX)
    assert "does not match the sha256 digest recorded in its private options" in stderr, stderr
    assert "--accept-digest-mismatch" in stderr
    assert len(result.stdout) < image.layers[0]["size"], "the tail must be withheld"


@pytest.mark.parametrize("case", RECOMPRESSED_CASES)
def test_recompressed_layer_with_accept_digest_mismatch(
    lenient_keys: harness.Node, materials: harness.Materials, case: str
) -> None:
    """A node whose decoder has --accept-digest-mismatch in its args pulls and runs it."""
    key, image = recompressed_image(materials, case)
    assert "--accept-digest-mismatch" in lenient_keys.config_text()
    harness.write_key_files(lenient_keys.keys_dir, key.files)
    assert_pulls(lenient_keys, image)


# --- recipients and refusals ------------------------------------------------------------------


def _jwe_recipient_count(image: harness.PushedImage) -> int:
    annotation = image.layers[0]["annotations"]["org.opencontainers.image.enc.keys.jwe"]
    count = 0
    for blob in annotation.split(","):
        jwe = json.loads(base64.b64decode(blob))
        count += len(jwe.get("recipients", [jwe]))
    return count


def test_two_recipients_each_key_alone(keys: harness.Node, materials: harness.Materials) -> None:
    """An image encrypted for an RSA and an EC key pulls with either key alone."""
    rsa_key = materials.key("recipient-rsa", "rsa", "pkcs8-pem")
    ec_key = materials.key("recipient-ec", "ec-p256", "pkcs8-pem")
    image = materials.image("two-recipients", [rsa_key.public_pem, ec_key.public_pem])
    assert _jwe_recipient_count(image) == 2
    harness.write_key_files(keys.keys_dir, rsa_key.files)
    assert_pulls(keys, image)
    # Forget the image (and its snapshots), then the EC key alone, in the second key directory.
    keys.remove_image(image)
    keys.clear_keys()
    harness.write_key_files(keys.extra_keys_dir, ec_key.files)
    assert_pulls(keys, image)


def test_node_without_the_key(keys: harness.Node, materials: harness.Materials) -> None:
    """The pull fails with our message, nothing is unpacked, and with the key it then works."""
    key = materials.key("no-key", "rsa", "pkcs8-pem")
    unrelated = materials.key("no-key-unrelated", "ec-p384", "pkcs8-pem")
    image = materials.image("no-key", [key.public_pem])
    harness.write_key_files(keys.keys_dir, unrelated.files)
    details = assert_refused(keys, image)
    assert "EC P-384" in details  # the key it tried is named
    assert "RSA-OAEP" in details  # and what the layer is wrapped for
    harness.write_key_files(keys.keys_dir, key.files)
    assert_pulls(keys, image)


def test_node_with_no_keys_at_all(keys: harness.Node, materials: harness.Materials) -> None:
    key = materials.key("empty-node", "ec-p256", "sec1-pem")
    image = materials.image("empty-node", [key.public_pem])
    details = assert_refused(keys, image)
    assert "no usable private key" in details


# --- key directory layouts --------------------------------------------------------------------


def test_kubernetes_secret_layout(keys: harness.Node, materials: harness.Materials) -> None:
    """Keys mounted from a Secret: `..<timestamp>/` real files, `..data` and links through it."""
    key = materials.key("secret", "rsa", "pkcs1-pem")
    image = materials.image("secret", [key.public_pem])
    harness.write_kubernetes_secret(keys.keys_dir, key.files)
    assert (keys.keys_dir / "..data").is_symlink()
    assert (keys.keys_dir / key.key_file).is_symlink()
    assert_pulls(keys, image)


def test_stray_files_beside_the_key(keys: harness.Node, materials: harness.Materials) -> None:
    """A README and the public key in the key directory do not get in the way."""
    key = materials.key("stray", "ec-p521", "sec1-pem")
    image = materials.image("stray", [key.public_pem])
    stray = {
        "README": b"Private keys for image decryption live here. Do not share.\n",
        "key.pub.pem": Path(key.public_pem).read_bytes(),
        "notes/ssh_known_hosts": b"127.0.0.1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI\n",
    }
    harness.write_key_files(keys.keys_dir, {**stray, **key.files})
    assert_pulls(keys, image)

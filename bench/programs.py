"""The programs under measurement, found or built, and their versions.

- ours, pip: the console script of the package as users install it: `pip install .` (not
  editable: the development venv's editable install makes `site` import setuptools' finder,
  ~8 ms a start) into a venv in the bench cache, reinstalled when the sources change;
- ours, bundle: the PyInstaller onedir program `dist/ctd-decoder/ctd-decoder`, built with
  `bash packaging/build.sh` when it is missing or older than the decoder's sources;
- refdec: the Go ocicrypt reference decoder, `--refdec PATH` or $REFDEC, else the integration
  harness's (`harness.refdec_program()`: $PYIMGCRYPT_REFDEC or one build of the team's
  `shared/reference/refdec/build.sh`, shared with the integration tests); never in the
  repository;
- the encoder: `ctd-encoder` of that same install; skopeo, containerd from the system.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import harness

from bench import REPO_ROOT, data
from bench.measure import BenchError, program_env

PIP_VENV = data.cache_root() / "pip-venv"
VENV_BIN = PIP_VENV / "bin"
PIP_DECODER = VENV_BIN / "ctd-decoder"
ENCODER = VENV_BIN / "ctd-encoder"
PIP_MARKER = PIP_VENV / "installed-from"
BUNDLE = REPO_ROOT / "dist" / "ctd-decoder" / "ctd-decoder"
BUILD_SCRIPT = REPO_ROOT / "packaging" / "build.sh"


def command_output(argv: list[str], timeout: float = 120) -> str:
    """stdout (else stderr) of a short command, stripped; "" when it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env=program_env())
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout.strip() or done.stderr.strip()).splitlines()[0] if (
        done.stdout.strip() or done.stderr.strip()) else ""


def _sources_newer_than(built: float, *extra: Path) -> bool:
    package = REPO_ROOT / "decoder"
    sources = [*package.rglob("*.py"), *package.rglob("*.c"), *extra]
    return any(path.stat().st_mtime > built for path in sources if path.exists())


def _bundle_is_stale() -> bool:
    return _sources_newer_than(BUNDLE.stat().st_mtime, REPO_ROOT / "packaging" / "ctd-decoder.spec")


def pip_install(log: Callable[[str], None]) -> Path:
    """PIP_DECODER, (re)installed with `pip install .` when missing or older than the sources."""
    if (PIP_DECODER.exists() and PIP_MARKER.exists()
            and not _sources_newer_than(PIP_MARKER.stat().st_mtime, REPO_ROOT / "pyproject.toml")):
        return PIP_DECODER
    log(f"bench: installing the package into {PIP_VENV} (pip install .)")
    python = VENV_BIN / "python"
    if not python.exists():
        _run_or_fail([sys.executable, "-m", "venv", str(PIP_VENV)])
    _run_or_fail([str(python), "-m", "pip", "install", "-q", str(REPO_ROOT)])  # with dependencies
    _run_or_fail([str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps",
                  str(REPO_ROOT)])  # this source tree, even at an unchanged version number
    PIP_MARKER.write_text(f"{REPO_ROOT}\n")
    return PIP_DECODER


def _run_or_fail(argv: list[str]) -> None:
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          check=False)
    if done.returncode != 0:
        output = done.stdout[-2000:] + done.stderr[-2000:]
        raise BenchError(f"{' '.join(argv[:4])} failed:\n{output}")


def bundle(rebuild: bool, log: Callable[[str], None]) -> Path:
    """The PyInstaller program; (re)built when missing, or stale and `rebuild` is set."""
    if BUNDLE.exists() and not (rebuild and _bundle_is_stale()):
        if _bundle_is_stale():
            log("bench: note: dist/ctd-decoder is older than the decoder's sources (not rebuilt)")
        return BUNDLE
    log("bench: building the PyInstaller bundle (bash packaging/build.sh)")
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1200, check=False)
    if done.returncode != 0 or not BUNDLE.exists():
        raise BenchError("packaging/build.sh failed:\n" + done.stdout[-2000:] + done.stderr[-2000:])
    return BUNDLE


def refdec(explicit: str | None, log: Callable[[str], None]) -> Path:
    """The reference decoder: --refdec / $REFDEC, else the integration harness's (built once,
    on first use, and shared with the integration tests)."""
    chosen = explicit or os.environ.get("REFDEC")
    if chosen:
        return _executable(Path(chosen))
    log("bench: reference decoder from the integration harness (built on first use)")
    try:
        return _executable(harness.refdec_program())
    except harness.HarnessError as e:
        raise BenchError(f"{e}; pass --refdec PATH") from e


def _executable(path: Path) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise BenchError(f"refdec {path} is not an executable file")
    return path


def go_version(binary: Path) -> str:
    """The Go toolchain a binary was built with, read from its build info."""
    go = binary.parent / "venv" / "bin" / "go"
    if go.is_file():
        text = command_output([str(go), "version", str(binary)])
        match = re.search(r"go\d+\.\d+(?:\.\d+)?", text)
        if match:
            return match.group(0)
    with binary.open("rb") as f:
        found = re.search(rb"go1\.\d+(?:\.\d+)?", f.read(16 * 1024 * 1024))
    return found.group(0).decode() if found else "unknown"


# Whether decoder._sha256pair (the HMAC and digest hashed together) runs in an install.
PAIR_CHECK = (
    "from decoder import sha256pair\n"
    "print('in use' if sha256pair.native() else "
    "'not in use: hashes with cryptography (not built, or no SHA extensions)')"
)


def versions(refdec_path: Path | None, bundle_path: Path | None) -> dict[str, str]:
    """Versions of everything measured, for the report."""
    out: dict[str, str] = {
        "python": platform.python_version(),
        "ctd-decoder": command_output([str(PIP_DECODER), "--version"]) or "missing",
    }
    for package in ("cryptography", "jwcrypto", "protobuf", "pyinstaller"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    out["openssl (cryptography)"] = _cryptography_openssl()
    out["SHA-256 pair (pip)"] = command_output([str(VENV_BIN / "python"), "-c", PAIR_CHECK])
    if bundle_path is not None:
        out["bundle"] = command_output([str(bundle_path), "--version"]) or "missing"
        carried = any((bundle_path.parent / "_internal" / "decoder").glob("_sha256pair.*"))
        out["SHA-256 pair (bundle)"] = "carried" if carried else "missing: hashes with cryptography"
    if refdec_path is not None:
        out["refdec (Go)"] = go_version(refdec_path)
    out["ctd-encoder"] = (command_output([str(ENCODER), "--version"]) if ENCODER.exists()
                          else "missing")
    out["skopeo"] = command_output(["skopeo", "--version"])
    out["containerd"] = command_output(["containerd", "--version"])
    out["umoci"] = command_output(["umoci", "--version"])
    out["git"] = command_output(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"])
    return out


def _cryptography_openssl() -> str:
    try:
        from cryptography.hazmat.backends.openssl import backend
    except ImportError:
        return "unknown"
    return str(backend.openssl_version_text())

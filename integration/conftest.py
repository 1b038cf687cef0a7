"""Fixtures of the integration suite: a shared registry and test material, a node per decoder.

Owns the lifetime of the components `harness` knows how to run. Session scope throughout: one
registry, one cache of keys and pushed images (built once, pulled by every node; each node has
its own containerd, so an image is new to each), and one containerd per decoder variant:
"pip" (the console script of the installed package) and "bundle" (the PyInstaller onedir
program). The bundle comes from $CTD_DECODER_BUNDLE, else dist/ctd-decoder/ctd-decoder, which
`bash packaging/build.sh` is run once to produce when missing or older than the decoder's
sources; a bundle that cannot be had is a failure, never a skip. A second, "lenient" node per
variant runs the decoder with --accept-digest-mismatch, for the cases that need it.
Set PYIMGCRYPT_IT_KEEP=1 to keep the work directory (logs, configs).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

DECODER_VARIANTS = ("pip", "bundle")
BUNDLE_PROGRAM = harness.REPO_ROOT / "dist" / "ctd-decoder" / "ctd-decoder"
BUILD_SCRIPT = harness.REPO_ROOT / "packaging" / "build.sh"


@dataclass(frozen=True)
class Decoder:
    """A decoder under test: which variant, the program containerd runs, its --version line."""

    variant: str
    path: Path
    version: str


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    harness.require_tools()
    keep = os.environ.get("PYIMGCRYPT_IT_KEEP") == "1"
    with harness.work_dir("pyimgcrypt-it-", keep=keep) as path:
        if keep:
            print(f"\nintegration work directory (kept): {path}")
        yield path


@pytest.fixture(scope="session")
def registry(work: Path) -> Iterator[harness.Registry]:
    with harness.Registry(work / "registry") as reg:
        yield reg


@pytest.fixture(scope="session")
def materials(work: Path, registry: harness.Registry) -> harness.Materials:
    return harness.Materials(work / "materials", registry)


def _bundle_is_stale() -> bool:
    """True when a decoder source or the PyInstaller spec is newer than the bundled program."""
    built = BUNDLE_PROGRAM.stat().st_mtime
    sources = [*(harness.REPO_ROOT / "decoder").rglob("*.py"),
               BUILD_SCRIPT.parent / "ctd-decoder.spec"]
    return any(path.stat().st_mtime > built for path in sources if path.exists())


@pytest.fixture(scope="session")
def bundle_decoder() -> Path:
    """The PyInstaller onedir program: $CTD_DECODER_BUNDLE, else dist/ctd-decoder/ctd-decoder,
    which `bash packaging/build.sh` (re)builds when it is missing or older than the sources."""
    from_env = os.environ.get("CTD_DECODER_BUNDLE")
    if from_env:
        return Path(from_env).resolve()
    if not BUNDLE_PROGRAM.exists() or _bundle_is_stale():
        if not BUILD_SCRIPT.is_file():
            pytest.fail(f"no usable decoder bundle: {BUNDLE_PROGRAM} is missing or stale and "
                        f"there is no {BUILD_SCRIPT} to build it (or set CTD_DECODER_BUNDLE)")
        result = harness.run(["bash", BUILD_SCRIPT], check=False, timeout=1800,
                             extra_env={"VENV": sys.prefix})
        if result.returncode != 0 or not BUNDLE_PROGRAM.exists():
            pytest.fail(f"`bash {BUILD_SCRIPT}` did not produce {BUNDLE_PROGRAM} "
                        f"(exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return BUNDLE_PROGRAM


@pytest.fixture(scope="session", params=DECODER_VARIANTS)
def decoder(request: pytest.FixtureRequest) -> Decoder:
    variant: str = request.param
    path = harness.pip_decoder() if variant == "pip" else request.getfixturevalue("bundle_decoder")
    try:
        version = harness.check_decoder(path)
    except harness.HarnessError as e:
        pytest.fail(f"{variant} decoder unusable: {e}")
    return Decoder(variant, path, version)


@pytest.fixture(scope="session")
def node(decoder: Decoder, registry: harness.Registry, work: Path) -> Iterator[harness.Node]:
    """A containerd whose CRI plugin decrypts with `decoder`; stopped when the variant is done."""
    with harness.Node(work / f"node-{decoder.variant}", decoder.path, registry.host,
                      name=decoder.variant) as started:
        yield started


@pytest.fixture(scope="session")
def lenient_node(
    decoder: Decoder, registry: harness.Registry, work: Path
) -> Iterator[harness.Node]:
    """A second containerd for `decoder`, whose decoder runs with --accept-digest-mismatch."""
    with harness.Node(work / f"node-{decoder.variant}-lenient", decoder.path, registry.host,
                      name=f"{decoder.variant}-lenient",
                      decoder_args=("--accept-digest-mismatch",)) as started:
        yield started


@pytest.fixture
def lenient_keys(lenient_node: harness.Node) -> Iterator[harness.Node]:
    """The lenient node with both of its key directories empty."""
    lenient_node.clear_keys()
    yield lenient_node
    lenient_node.clear_keys()


@pytest.fixture
def keys(node: harness.Node) -> Iterator[harness.Node]:
    """The node with both of its key directories empty; the test puts in what it needs."""
    node.clear_keys()
    yield node
    node.clear_keys()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = harness.REFUSAL_STATS
    if stats.pulls:
        terminalreporter.write_line(
            f"refused pulls: {stats.pulls}, each reported with the decoder's own message "
            f"(lost to containerd's exit-status race: {stats.message_lost})"
        )

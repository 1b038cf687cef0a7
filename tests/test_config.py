"""The containerd config snippets in config/: their structure, and what a real containerd reads.

Both files are parsed with tomllib. The 1.x file (format version 2) is also loaded by the
containerd 1.6 on this machine (`containerd --config FILE config dump`), which must show the
same processors; so is the drop-in recipe of config/README.md. The integration suite goes
further: every containerd node it starts runs the 1.x file (integration/harness.py,
`shipped_snippet`) and pulls gzip, zstd and uncompressed encrypted layers through CRI.

The 2.x file (format version 3) needs containerd 2.x, which Debian 12 does not have: it has
never been loaded by a real containerd 2.x here, and only its structure is checked (plus what
containerd 1.6 makes of it, which config/README.md warns about). A missing containerd fails
the tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from decoder.spec import ENCRYPTED_TO_PLAIN

ROOT = Path(__file__).resolve().parent.parent
CONFIG_1X = ROOT / "config" / "containerd-1.x.toml"
CONFIG_2X = ROOT / "config" / "containerd-2.x.toml"

GZIP_ID = "io.containerd.ocicrypt.decoder.v1.tar.gzip"
TAR_ID = "io.containerd.ocicrypt.decoder.v1.tar"
OCI = "application/vnd.oci.image.layer.v1.tar"
NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar"
EXPECTED_PROCESSORS: dict[str, dict[str, Any]] = {
    GZIP_ID: {
        "accepts": [
            f"{OCI}+gzip+encrypted",
            f"{OCI}+zstd+encrypted",
            f"{NONDIST}+gzip+encrypted",
            f"{NONDIST}+zstd+encrypted",
            f"{DOCKER}.gzip+encrypted",
        ],
        "returns": f"{OCI}+gzip",
    },
    TAR_ID: {
        "accepts": [f"{OCI}+encrypted", f"{NONDIST}+encrypted", f"{DOCKER}+encrypted"],
        "returns": OCI,
    },
}
COMMON = {
    "path": "/usr/local/bin/ctd-decoder",
    "args": ["--decryption-keys-path", "/etc/containerd/ocicrypt/keys"],
    "env": ["OCICRYPT_KEYPROVIDER_CONFIG=/etc/containerd/ocicrypt/ocicrypt_keyprovider.conf"],
}
CRI_1X = "io.containerd.grpc.v1.cri"
CRI_IMAGES_2X = "io.containerd.cri.v1.images"


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def containerd_dump(config: Path) -> dict[str, Any]:
    """The effective config containerd builds from `config` (defaults merged in)."""
    if shutil.which("containerd") is None:
        pytest.fail("containerd is not installed: run `make deps` (Debian package containerd)")
    result = subprocess.run(
        ["containerd", "--config", str(config), "config", "dump"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"containerd rejected {config}:\n{result.stderr}"
    return tomllib.loads(result.stdout)


@pytest.mark.parametrize("path", [CONFIG_1X, CONFIG_2X], ids=["1.x", "2.x"])
def test_stream_processors(path: Path) -> None:
    processors = load(path)["stream_processors"]
    assert set(processors) == {GZIP_ID, TAR_ID}, "only these two ids get a payload"
    for proc_id, expected in EXPECTED_PROCESSORS.items():
        assert processors[proc_id] == {**expected, **COMMON}, proc_id


def test_processors_cover_exactly_the_decoders_media_types() -> None:
    """Every type the decoder decrypts goes to one processor: compressed ones to the gzip id
    (containerd decompresses after it, detecting gzip or zstd), plain tars to the tar id."""
    accepted: list[str] = []
    for proc_id, proc in load(CONFIG_1X)["stream_processors"].items():
        for media_type in proc["accepts"]:
            compressed = ENCRYPTED_TO_PLAIN[media_type].endswith(("gzip", "zstd"))
            assert proc_id == (GZIP_ID if compressed else TAR_ID), media_type
        accepted += proc["accepts"]
    assert sorted(accepted) == sorted(ENCRYPTED_TO_PLAIN)


def test_1x_config_layout() -> None:
    config = load(CONFIG_1X)
    assert config["version"] == 2
    assert set(config) == {"version", "plugins", "stream_processors"}
    assert config["plugins"] == {CRI_1X: {"image_decryption": {"key_model": "node"}}}


def test_2x_config_layout() -> None:
    config = load(CONFIG_2X)
    assert config["version"] == 3
    assert set(config) == {"version", "plugins", "stream_processors"}
    assert config["plugins"] == {
        CRI_IMAGES_2X: {"use_local_image_pull": True, "image_decryption": {"key_model": "node"}}
    }


def test_both_files_register_the_same_processors() -> None:
    assert load(CONFIG_1X)["stream_processors"] == load(CONFIG_2X)["stream_processors"]


def test_containerd_loads_1x_config() -> None:
    dump = containerd_dump(CONFIG_1X)
    assert dump["stream_processors"] == load(CONFIG_1X)["stream_processors"]
    assert dump["plugins"][CRI_1X]["image_decryption"]["key_model"] == "node"


def test_containerd_default_config_already_has_both_ids() -> None:
    """What config/README.md says of containerd >= 1.5 defaults, on this machine's containerd."""
    if shutil.which("containerd") is None:
        pytest.fail("containerd is not installed: run `make deps` (Debian package containerd)")
    result = subprocess.run(
        ["containerd", "config", "default"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    defaults = tomllib.loads(result.stdout)
    processors = defaults["stream_processors"]
    assert set(processors) == {GZIP_ID, TAR_ID}
    for proc_id, proc in processors.items():
        assert proc["path"] == "ctd-decoder", proc_id
        assert (proc["args"], proc["env"]) == (COMMON["args"], COMMON["env"]), proc_id
        assert proc["returns"] == EXPECTED_PROCESSORS[proc_id]["returns"], proc_id
    assert defaults["plugins"][CRI_1X]["image_decryption"]["key_model"] == "node"


def test_readme_drop_in_keeps_the_main_configs_cri_settings(tmp_path: Path) -> None:
    """config/README.md's drop-in (version line + the stream_processors tables) adds the
    processors without touching the CRI table of the main config."""
    text = CONFIG_1X.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("[stream_processors"))
    drop_in = tmp_path / "conf.d" / "ctd-decoder.toml"
    drop_in.parent.mkdir()
    drop_in.write_text("version = 2\n" + "".join(lines[start:]), encoding="utf-8")
    main = tmp_path / "config.toml"
    main.write_text(
        "version = 2\n"
        f'imports = ["{drop_in.parent}/*.toml"]\n'
        f'[plugins."{CRI_1X}"]\n'
        '  sandbox_image = "registry.example/pause:kept"\n',
        encoding="utf-8",
    )
    dump = containerd_dump(main)
    assert dump["plugins"][CRI_1X]["sandbox_image"] == "registry.example/pause:kept"
    assert dump["stream_processors"] == load(CONFIG_1X)["stream_processors"]


def test_snippet_as_drop_in_would_reset_the_cri_table(tmp_path: Path) -> None:
    """Why config/README.md warns against importing the snippet unchanged (containerd 1.6)."""
    main = tmp_path / "config.toml"
    main.write_text(
        "version = 2\n"
        f'imports = ["{CONFIG_1X}"]\n'
        f'[plugins."{CRI_1X}"]\n'
        '  sandbox_image = "registry.example/pause:kept"\n',
        encoding="utf-8",
    )
    dump = containerd_dump(main)
    assert dump["plugins"][CRI_1X]["sandbox_image"] != "registry.example/pause:kept"


def test_containerd_1x_drops_the_2x_files_cri_tables() -> None:
    """config/README.md: containerd 1.x reads the version-3 file as version 2 without an error
    and silently drops its CRI tables (so a 1.x node must never get the 2.x file). This is
    containerd 1.6 reading it; no containerd 2.x is involved."""
    dump = containerd_dump(CONFIG_2X)
    assert dump["version"] == 2
    assert CRI_IMAGES_2X not in dump["plugins"]
    assert "use_local_image_pull" not in dump["plugins"][CRI_1X]

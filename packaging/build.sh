#!/usr/bin/env bash
# Builds the release artifacts of pyimgcrypt (what `make package` runs):
#   dist/ctd-decoder/                                  PyInstaller onedir bundle, with config/
#   dist/ctd-decoder-<version>-linux-<arch>.tar.gz     install-root tarball: `tar -C / -xzf`
#   dist/SHA256SUMS                                    `sha256sum -c` format
# Reproducible: PYTHONHASHSEED=0 and SOURCE_DATE_EPOCH (from the environment, else the last
# git commit) make two builds of one commit with the same toolchain bit-identical.
# Idempotent: every run starts from a clean work directory and replaces its own outputs.
# Environment: VENV (default .venv) is the virtualenv to build in; it gets PyInstaller
# from pyproject's `package` extra when that is missing or not the pinned version.
# DIST_DIR (default dist) and BUILD_DIR (default build), relative to the repository root or
# absolute, move the outputs and the scratch space.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${VENV:-.venv}
py=$venv/bin/python
dist=${DIST_DIR:-dist}
work=${BUILD_DIR:-build}
name=ctd-decoder
install_dir=opt/$name
bin_dir=usr/local/bin

say() { printf 'build.sh: %s\n' "$*" >&2; }

# --- toolchain -------------------------------------------------------------------------
if [ ! -x "$py" ]; then
	say "creating virtualenv $venv"
	python3 -m venv "$venv"
fi
# Exit 0 when the installed PyInstaller and hooks match every `==` pin of the package extra.
pins_satisfied() {
	"$py" - <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["package"]
for requirement in extra:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:==\s*([^\s;]+))?.*", requirement)
    if not match:
        continue
    try:
        installed = md.version(match[1])
    except md.PackageNotFoundError:
        sys.exit(1)
    if match[2] and installed != match[2]:
        sys.exit(1)
PY
}
if ! pins_satisfied; then
	say "installing PyInstaller into $venv (pyproject extra 'package')"
	"$venv/bin/pip" install -q -e '.[package]'
	pins_satisfied || { say "PyInstaller still does not match the pins in pyproject.toml"; exit 1; }
fi

# --- reproducibility inputs ------------------------------------------------------------
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null) || {
		say "not a git checkout: set SOURCE_DATE_EPOCH"
		exit 1
	}
fi
export SOURCE_DATE_EPOCH PYTHONHASHSEED=0
version=$("$py" -c 'import decoder; print(decoder.__version__)')
case $(uname -m) in
	x86_64) arch=amd64 ;;
	aarch64 | arm64) arch=arm64 ;;
	*) arch=$(uname -m) ;;
esac
tarball=$name-$version-linux-$arch.tar.gz

# --- PyInstaller onedir bundle ---------------------------------------------------------
say "building $name $version (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
rm -rf "$work/pyinstaller" "$dist/$name"
"$venv/bin/pyinstaller" --clean --noconfirm --log-level WARN \
	--distpath "$dist" --workpath "$work/pyinstaller" packaging/ctd-decoder.spec
# An excluded module that a bundled module imports at top level would break at run time.
if grep -h '^excluded module named .*(top-level)' "$work"/pyinstaller/*/warn-*.txt; then
	say "the spec excludes a module that the programs import (lines above)"
	exit 1
fi
"$dist/$name/$name" --version >/dev/null || { say "the bundled $name does not start"; exit 1; }
# The containerd snippets travel with the programs, so a node needs no checkout to merge them.
mkdir -p "$dist/$name/config"
cp config/README.md config/containerd-1.x.toml config/containerd-2.x.toml "$dist/$name/config/"

# --- install-root tarball --------------------------------------------------------------
stage=$work/stage
rm -rf "$stage"
mkdir -p "$stage/$install_dir" "$stage/$bin_dir"
cp -a "$dist/$name/." "$stage/$install_dir/"
# Permissions independent of the builder's umask: rwxr-xr-x / rw-r--r--.
chmod -R u+rwX,go+rX,go-w "$stage"
links=()
for program in "$stage/$install_dir"/*; do
	if [ -f "$program" ] && [ -x "$program" ]; then
		base=$(basename "$program")
		# Relative, so it resolves both after `tar -C / -xzf` and in any other extraction root.
		ln -s "../../../$install_dir/$base" "$stage/$bin_dir/$base"
		links+=("$bin_dir/$base")
	fi
done
mkdir -p "$dist"
rm -f "$dist/$name"-*-linux-"$arch".tar.gz "$dist/SHA256SUMS"
# Only opt/ctd-decoder and the links are archived, not usr/, usr/local/ ... themselves, so
# extracting at / leaves the owner, mode and mtime of those system directories alone.
mapfile -t members < <(printf '%s\n' "$install_dir" "${links[@]}" | LC_ALL=C sort)
tar --sort=name --format=gnu --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
	-C "$stage" -cf - "${members[@]}" | gzip -n -9 >"$dist/$tarball"
(cd "$dist" && sha256sum "$tarball" >SHA256SUMS)

out=$(cd "$dist" && pwd)
size=$(du -sh "$out/$name" | cut -f1)
printf '%s\n' \
	"bundle:    $out/$name/ ($size; the program is $out/$name/$name)" \
	"tarball:   $out/$tarball" \
	"checksums: $out/SHA256SUMS" \
	"install:   tar -C / -xzf $out/$tarball   (/$install_dir/ with config/, /$bin_dir/ctd-decoder and ctd-encoder)"

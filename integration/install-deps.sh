#!/usr/bin/env bash
# Installs the Debian packages the demo and the tests use, without turning this machine into
# a server: Debian starts and enables containerd and docker-registry (listening on :5000 on
# every interface) when it installs them. Services of packages installed here are neither
# started (policy-rc.d) nor enabled; packages that were already installed are left alone.
set -euo pipefail
missing=()
for package in "$@"; do
	status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
	[ "$status" = "install ok installed" ] || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\n# pyimgcrypt install-deps: do not start services while installing\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	made_policy=1
fi
cleanup() { [ -z "$made_policy" ] || rm -f "$policy"; }
trap cleanup EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
for package in "${missing[@]}"; do
	case "$package" in
	containerd | docker-registry)
		if [ -d /run/systemd/system ]; then
			systemctl disable --now "$package" >/dev/null 2>&1 || true
			echo "  $package: installed for the tests only; its system service is disabled"
		fi
		;;
	esac
done

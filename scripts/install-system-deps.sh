#!/usr/bin/env bash
# Debian packages for offscreen MuJoCo rendering (EGL, software GL). Installs what is missing.
set -euo pipefail
pkgs=(libegl1 libegl-mesa0 libgl1-mesa-dri)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "missing Debian packages: ${missing[*]}; install them with: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
else SUDO=""; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (run as root).
# Idempotent: skips apt entirely when everything is already there.
set -euo pipefail
packages=(gcc libc6-dev python3 iproute2 util-linux curl rsync redis-server redis-tools postgresql-15 postgresql-client-15)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "test dependencies present: ${packages[*]}"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages (${missing[*]}); run this script as root to install them" >&2
  exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The Debian packages start a system redis on 6379 and a postgres cluster on 5432; the tests
# run their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now redis-server >/dev/null 2>&1 || true
  systemctl disable --now postgresql >/dev/null 2>&1 || true
fi

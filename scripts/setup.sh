#!/usr/bin/env bash
# Sets up everything vmsnap and its tests need on a fresh Debian 12 machine:
# Debian packages (QEMU 10 from bookworm-backports, NBD clients, redis, restic, ...), npm dependencies
# (native modules built), the compiled CLI, and the fixture guests (cached under fixtures/guest/build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-system.sh
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # Not `npm ci`: npm 11 leaves the other platforms' optional prebuilt packages (e.g.
  # @napi-rs/blake-hash-darwin-arm64) out of the lock file, and `npm ci` then refuses the lock as
  # out of sync. `npm install` honours the locked versions and installs this platform's binaries.
  npm install --no-audit --no-fund
fi
# Native modules must really have built (npm may skip install scripts it does not trust).
node -e "require('zstd-napi'); require('@napi-rs/blake-hash'); require('lz4')" \
  || { echo "setup: native modules missing; run npm rebuild" >&2; exit 1; }
npm run build --silent
# Native helpers (C, built here so no binary is committed): see src/*/native/.
mkdir -p .cache/native
for src in src/*/native/*.c; do
  case "$src" in *.addon.c) continue ;; esac
  out=".cache/native/$(basename "$src" .c)"
  if [ ! -x "$out" ] || [ "$src" -nt "$out" ]; then gcc -O2 -Wall -Wextra -o "$out" "$src"; fi
done
# Node addons (*.addon.c -> NAME.node) against the running node's headers; its OpenSSL symbols
# resolve inside node itself. Optional: without them vmsnap falls back to node:crypto.
# -z now: a symbol this node does not export fails the load (crypto.ts then falls back) rather than
# the first call. Rebuilt when the source or the node binary changes.
node_bin="$(readlink -f "$(command -v node)")"
node_include="$(dirname "$(dirname "$node_bin")")/include/node"
# NodeSource's nodejs package and nvm ship the headers with node; Debian's own nodejs package does
# not (they are in libnode-dev), so a fresh Debian with the distribution's node gets them here.
if [ ! -f "$node_include/node_api.h" ] && dpkg -S "$node_bin" 2>/dev/null | grep -q '^nodejs:' \
  && ! apt-cache policy nodejs 2>/dev/null | grep -q nodesource; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnode-dev >/dev/null || true
fi
for src in src/*/native/*.addon.c; do
  out=".cache/native/$(basename "$src" .addon.c).node"
  if [ -f "$out" ] && [ ! "$src" -nt "$out" ] && [ ! "$node_bin" -nt "$out" ]; then continue; fi
  if [ -f "$node_include/node_api.h" ] && [ -f "$node_include/openssl/evp.h" ]; then
    gcc -O2 -Wall -Wextra -shared -fPIC -Wl,-z,now -I"$node_include" -o "$out" "$src"
  else
    echo "setup: no Node headers with OpenSSL under $node_include: $src not built (node:crypto is used instead)" >&2
  fi
done
if [ -x fixtures/guest/build.sh ]; then bash fixtures/guest/build.sh; fi
if [ -x fixtures/guest/build-iso.sh ]; then bash fixtures/guest/build-iso.sh; fi
if [ -x fixtures/guest/build-agent.sh ]; then bash fixtures/guest/build-agent.sh; fi
# The Debian guest image (fixtures/debian/build.sh: debootstrap from the Debian archive, 2-5 min the
# first time, cached in fixtures/debian/build/). debootstrap needs root; without it its tests skip.
if [ "$(id -u)" -eq 0 ]; then
  bash fixtures/debian/build.sh
elif [ ! -f fixtures/debian/build/debian.img ]; then
  echo "setup: not root, so the Debian guest image is not built (sudo bash fixtures/debian/build.sh); test/vm/debian-guest.test.ts skips" >&2
fi

#!/usr/bin/env bash
# Builds the ingest benchmark's disk image: a 2 GiB ext4 file system holding a copy of part of
# /usr (about 1.2 GiB of real files: binaries, shared data, Python, GCC), the rest free space.
#
#   bash bench/ingest/make-image.sh [OUT]        (default $BENCH_DIR/images/base.img)
#
# Cached: an existing OUT is kept. Reproducible on one machine: the source tree is first copied to
# a frozen directory (so packages installed later do not change it), and mke2fs runs with a fixed
# UUID, hash seed and clock. Needs root (mkfs.ext4 -d preserves owners). Prints the image's SHA-256.
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/vmsnap-bench}
OUT=${1:-$BENCH_DIR/images/base.img}
SRC=$BENCH_DIR/images/usr-copy
SIZE=2G
PARTS=(bin share lib/python3.11 lib/gcc)

if [[ -s $OUT ]]; then
  echo "image: $OUT (cached)" >&2
  exit 0
fi
mkdir -p "$(dirname "$OUT")"
fstype=$(stat -f -c %T "$(dirname "$OUT")")
if [[ $fstype == tmpfs ]]; then
  echo "refusing to build the image on tmpfs ($(dirname "$OUT")): set BENCH_DIR" >&2
  exit 1
fi

if [[ ! -e $SRC/.complete ]]; then
  rm -rf "$SRC"
  mkdir -p "$SRC/usr/lib"
  for p in "${PARTS[@]}"; do
    if [[ -e /usr/$p ]]; then
      mkdir -p "$SRC/usr/$(dirname "$p")"
      cp -a "/usr/$p" "$SRC/usr/$p"
    fi
  done
  touch "$SRC/.complete"
fi
echo "source tree: $(du -sh --apparent-size "$SRC" | cut -f1) in $(find "$SRC" | wc -l) entries" >&2

rm -f "$OUT.tmp"
E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L vmsnap-bench \
  -U 6b1c8a4e-2f0d-4c39-9a57-3d5e0f1b2a64 -E hash_seed=0b7e2d6a-5c41-4f8e-8d3b-1a9c6e2f4b70,root_owner=0:0 \
  -d "$SRC" "$OUT.tmp" "$SIZE"
mv "$OUT.tmp" "$OUT"
echo "image: $OUT $(du -h --apparent-size "$OUT" | cut -f1) apparent, $(du -h "$OUT" | cut -f1) allocated" >&2
sha256sum "$OUT" | cut -d' ' -f1

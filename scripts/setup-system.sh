#!/usr/bin/env bash
# Installs the Debian packages vmsnap and its tests need, on a fresh Debian 12 (bookworm) machine.
# Idempotent: a second run with everything present is a no-op in well under a second.
# QEMU must be 10.x (bookworm-backports): QEMU 7.2 leaves stale pages after live migration under TCG.
set -euo pipefail

need_root() { if [ "$(id -u)" -ne 0 ]; then echo "setup-system: run as root (or with sudo) to install Debian packages" >&2; exit 1; fi; }

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }

missing=()
[ "$(qemu_major)" = "10" ] || missing+=(qemu)
# g++, make and python3: node-gyp builds the lz4 addon (and zstd-napi when no prebuilt binary fits)
# during npm install. pgrep (procps): the VM tests' leak check. /usr/bin/time (time): the benchmarks.
# ip, tc (iproute2): the migration tests' two hosts (test/helpers/netns.ts).
# chromium: the dashboard test renders the page in a real headless browser (test/jobs/dashboard.test.ts).
for bin in qemu-img:qemu nbdinfo:libnbd-bin nbdcopy:libnbd-bin redis-server:redis-server restic:restic cpio:cpio \
           gcc:gcc g++:g++ make:make python3:python3 pgrep:procps /usr/bin/time:time \
           zstd:zstd mkfs.ext4:e2fsprogs fio:fio nbdkit:nbdkit ip:iproute2 tc:iproute2 \
           grub-mkrescue:grub-common xorriso:xorriso mformat:mtools qemu-ga:qemu-guest-agent chromium:chromium; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin#*:}")
done
[ -x /bin/busybox ] && /bin/busybox --help 2>&1 | grep -q 'static' || dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
dpkg -s gcc-multilib >/dev/null 2>&1 || missing+=(gcc-multilib)
# Desktop guests: GRUB for BIOS and UEFI (the fixture ISO, fixtures/guest/build-iso.sh), OVMF (UEFI VMs).
# The Debian guest (fixtures/debian/build.sh): debootstrap, sfdisk (fdisk), mkfs.fat (dosfstools).
for pkg in grub-pc-bin grub-efi-amd64-bin ovmf debootstrap fdisk dosfstools; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done

if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
need_root
echo "setup-system: installing ${missing[*]}" >&2

bp=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$bp" ]; then
  cat > "$bp" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq libnbd-bin nbdkit redis-server restic cpio gcc g++ make python3 procps time gcc-multilib busybox-static \
  zstd e2fsprogs fio iproute2 grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools ovmf qemu-guest-agent chromium \
  debootstrap fdisk dosfstools >/dev/null
[ "$(qemu_major)" = "10" ] || { echo "setup-system: QEMU 10 did not install (got: $(qemu-system-x86_64 --version | head -1))" >&2; exit 1; }
echo "setup-system: done ($(qemu-system-x86_64 --version | head -1))" >&2

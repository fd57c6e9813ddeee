#!/usr/bin/env bash
# The main job, end to end, on the local repository: boot the fixture Linux guest on vmsnap volumes,
# take a live snapshot, let the guest run on, restore the snapshot, and show from the guest's own
# status lines that it continued from the snapshot point with no memory or disk errors.
# Run through `npm run demo` (which runs scripts/setup.sh first) or directly after setup.
# Its work directory in /var/tmp is removed at exit unless VMSNAP_DEMO_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /var/tmp/vmsnap-demo.XXXXXX)
export VMSNAP_DATA_DIR="$work/data" VMSNAP_REPO="$work/repo"
V() { node bin/vmsnap.js "$@"; }
G=fixtures/guest/build
log="$VMSNAP_DATA_DIR/vms/demo/run/serial.log"
# The work directory (~120 MiB: repository, VM disk, RAM spill) is removed on every exit, success
# or failure; VMSNAP_DEMO_KEEP=1 keeps it to look around.
cleanup() {
  V vm stop demo >/dev/null 2>&1 || true
  if [ "${VMSNAP_DEMO_KEEP:-0}" = 1 ]; then echo "== kept $work (VMSNAP_DEMO_KEEP=1)"; else rm -rf -- "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
last_status() { grep -a 'VMSNAP-STATUS' "$log" | tail -1; }
gen_of() { sed -n 's/.* gen=\([0-9]*\).*/\1/p' <<<"$1"; }
wait_status() { for _ in $(seq 1 200); do grep -qa VMSNAP-STATUS "$log" 2>/dev/null && return 0; sleep 0.1; done; echo "no status from the guest" >&2; exit 1; }

echo "== repository: $VMSNAP_REPO"
V init
echo "== VM: fixture Linux guest, 256 MiB, one 64 MiB disk (vmsnap copy-on-write volume over NBD)"
V vm create demo --memory 256M --disk 64M --kernel "$G/vmlinuz" --initrd "$G/initramfs.cpio.gz" \
  --append "console=ttyS0 quiet vmsnap.mem=64 vmsnap.rate=2000 vmsnap.disk=/dev/vda"
V vm start demo
wait_status; sleep 3
before=$(last_status); echo "guest before take:  $before"
V take demo -m "known good" --tag demo
after=$(last_status); echo "guest after take:   $after"
snap=$(V --json ls --vm demo | node -e 'const a=JSON.parse(require("fs").readFileSync(0,"utf8")); console.log(a[a.length-1].id)')
echo "== the guest runs on for 4 s"
sleep 4
echo "guest now:          $(last_status)"
echo "== restore ${snap:0:12}"
V restore demo "$snap"
wait_status; sleep 2
first=$(grep -a VMSNAP-STATUS "$log" | head -1)
echo "guest after restore: $first"
echo "                     $(last_status)"
g0=$(gen_of "$before"); g1=$(gen_of "$after"); gr=$(gen_of "$first")
errs=$(grep -a VMSNAP-STATUS "$log" | sed -n 's/.* errors=\([0-9]*\).*disk_errors=\([0-9]*\).*/\1 \2/p' | awk '{s+=$1+$2} END {print s+0}')
if [ "$gr" -ge "$g0" ] && [ "$gr" -le "$((g1 + 2000))" ] && [ "$errs" -eq 0 ]; then
  echo "OK: the guest resumed at generation $gr (snapshot taken between $g0 and $g1) with 0 memory and disk errors"
else
  echo "FAILED: resumed at generation $gr, expected between $g0 and $g1; errors: $errs" >&2
  exit 1
fi

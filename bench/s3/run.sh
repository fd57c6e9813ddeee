#!/usr/bin/env bash
# Ingest and restore throughput: vmsnap to a local directory, vmsnap to S3 (s3rver on 127.0.0.1),
# and restic to the same s3rver in the same run; request counts from `vmsnap --stats`.
#   bash bench/s3/run.sh [SIZE_MIB]        (default 256; needs `npm run build` first)
# Data: SIZE_MIB of a disk-like image (1/4 zeros, 1/4 text, 1/2 random, in 1 MiB pieces).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-256}
W=$(mktemp -d /tmp/vmsnap-bench-s3.XXXXXX)
trap 'kill $S3PID 2>/dev/null || true; rm -rf "$W"' EXIT
export NODE_NO_WARNINGS=1 AWS_REGION=us-east-1

node -e '
const fs=require("fs");const n=+process.argv[1];const fd=fs.openSync(process.argv[2],"w");
const text=Buffer.alloc(1<<20,"the quick brown fox jumps over the lazy dog; ");
let x=12345;for(let i=0;i<n;i++){const k=i%4;let b;
 if(k===0)b=Buffer.alloc(1<<20);else if(k===1)b=text;else{b=Buffer.allocUnsafe(1<<20);for(let j=0;j<b.length;j+=4){x^=x<<13;x>>>=0;x^=x>>>17;x^=x<<5;x>>>=0;b.writeUInt32LE(x,j);}}
 fs.writeSync(fd,b);}fs.closeSync(fd);' "$SIZE" "$W/img"

node --import tsx bench/s3/s3rver-serve.ts > "$W/s3.json" & S3PID=$!
for _ in $(seq 100); do [ -s "$W/s3.json" ] && break; sleep 0.2; done
j() { node -pe "require('$W/s3.json').$1"; }
export AWS_ACCESS_KEY_ID=$(j accessKeyId) AWS_SECRET_ACCESS_KEY=$(j secretAccessKey)
URL=$(j url); ENDPOINT=$(j endpoint); BUCKET=$(j bucket)
V="node bin/vmsnap.js"
t() { local s=$(date +%s.%N); "$@" > "$W/last.out" 2> "$W/last.err"; local e=$(date +%s.%N); echo "$e - $s" | bc; }
mibs() { echo "scale=1; $SIZE / $1" | bc; }

echo "size: $SIZE MiB; node $(node -v); restic $(restic version | cut -d' ' -f2); $(nproc) cores"
$V --repo "$W/local" init -q >/dev/null
T=$(t $V --repo "$W/local" import "$W/img" --vm b -q); echo "vmsnap local  ingest : ${T}s  $(mibs $T) MiB/s"
T=$(t $V --repo "$W/local" export latest "$W/out1" -q); echo "vmsnap local  restore: ${T}s  $(mibs $T) MiB/s"; cmp "$W/img" "$W/out1"

$V --repo "$URL/vmsnap" init -q >/dev/null
T=$(t $V --stats --repo "$URL/vmsnap" import "$W/img" --vm b -q); echo "vmsnap s3     ingest : ${T}s  $(mibs $T) MiB/s"; sed 's/^/    /' "$W/last.err"
T=$(t $V --stats --repo "$URL/vmsnap" export latest "$W/out2" -q); echo "vmsnap s3     restore: ${T}s  $(mibs $T) MiB/s"; sed 's/^/    /' "$W/last.err"; cmp "$W/img" "$W/out2"
T=$(t $V --stats --repo "$URL/vmsnap" check); echo "vmsnap s3     check  : ${T}s"; sed 's/^/    /' "$W/last.err"
T=$(t $V --stats --repo "$W/local" copy latest --to "$URL/copy" --init); echo "vmsnap copy local->s3: ${T}s  $(mibs $T) MiB/s"; sed 's/^/    /' "$W/last.err"

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="s3:$ENDPOINT/$BUCKET/restic"
restic init -q >/dev/null 2>"$W/restic-init.err" || { cat "$W/restic-init.err"; exit 1; }
mkdir -p "$W/rs"; cp "$W/img" "$W/rs/img"
T=$(t restic backup -q "$W/rs"); echo "restic s3     ingest : ${T}s  $(mibs $T) MiB/s"; cat "$W/last.err"
T=$(t restic restore latest -q --target "$W/rr"); echo "restic s3     restore: ${T}s  $(mibs $T) MiB/s"; cmp "$W/img" "$W/rr$W/rs/img"
echo "objects in s3rver: vmsnap packs $(find "$(j directory)/$BUCKET/vmsnap/packs" -type f -name '*._S3rver_object' 2>/dev/null | wc -l), restic data $(find "$(j directory)/$BUCKET/restic/data" -type f -name '*._S3rver_object' 2>/dev/null | wc -l)"

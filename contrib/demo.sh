#!/usr/bin/env bash
# The dvk demo: builds everything, starts a 3-node cluster on this machine
# (loopback ports, one runtime dir per node), runs programs under the shim (a
# web server on node1 reached by name from node3) and shows the cluster.
# Everything it starts is stopped when it ends.
#
#   bash contrib/demo.sh          # run the demo and exit
#   bash contrib/demo.sh --keep   # leave the cluster up until you press Enter
set -euo pipefail
cd "$(dirname "$0")/.."
keep=no; [ "${1:-}" = "--keep" ] && keep=yes

cargo build --workspace --release --quiet
bin=$PWD/target/release
demo=$(mktemp -d /tmp/dvk-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$demo"
}
trap cleanup EXIT

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$demo/cluster.key"
chmod 600 "$demo/cluster.key"
echo 'cluster_key_file = "cluster.key"' > "$demo/cluster.toml"
base=$((20000 + RANDOM % 20000))
for i in 1 2 3; do
  cat >> "$demo/cluster.toml" <<TOML

[[node]]
name = "node$i"
id = $i
peer_addr = "127.0.0.1:$((base + i))"
runtime_dir = "$demo/node$i/run"
image_dir = "$demo/node$i/images"
TOML
done
export DVK_CONFIG=$demo/cluster.toml

echo "== starting 3 agents (logs in $demo/node*.log)"
for i in 1 2 3; do
  "$bin/dvk-agent" --node "node$i" 2> "$demo/node$i.log" &
  pids+=($!)
done
for _ in $(seq 100); do
  if [ "$("$bin/migrate-cli" --node node1 nodes --json 2>/dev/null | grep -c '"up": true')" = 3 ]; then break; fi
  sleep 0.1
done
"$bin/migrate-cli" --node node1 nodes

echo
echo "== a Python program under the shim on node2 (DVK_ENDPOINT=counter)"
DVK_AGENT_SOCK=$demo/node2/run/agent.sock DVK_ENDPOINT=counter LD_PRELOAD=$bin/libdvkshim.so \
  python3 -c 'import os, time
print("   inside: os.getpid() =", os.getpid(), " real pid =", os.readlink("/proc/self"), flush=True)
time.sleep(30)' &
pids+=($!)
sleep 0.5
echo
echo "== a web server under the shim on node1: it becomes endpoint web:8000 of dc0"
mkdir -p "$demo/www" && echo "hello from node1" > "$demo/www/index.txt"
(cd "$demo/www" && DVK_AGENT_SOCK=$demo/node1/run/agent.sock DVK_ENDPOINT=web LD_PRELOAD=$bin/libdvkshim.so \
  exec python3 -m http.server 8000 > "$demo/web.log" 2>&1) &
pids+=($!)
for _ in $(seq 100); do "$bin/migrate-cli" --node node3 endpoints | grep -q web:8000 && break; sleep 0.1; done

echo
echo "== migrate-cli ps and endpoints, asked on node3"
"$bin/migrate-cli" --node node3 ps
echo
"$bin/migrate-cli" --node node3 endpoints

echo
echo "== curl under the shim on node3 fetches http://web.dc0.dvk:8000/index.txt (relayed node3 -> node1)"
DVK_AGENT_SOCK=$demo/node3/run/agent.sock LD_PRELOAD=$bin/libdvkshim.so curl -sS --max-time 5 http://web.dc0.dvk:8000/index.txt

if [ "$keep" = yes ]; then
  echo
  echo "cluster config: $DVK_CONFIG — try: DVK_CONFIG=$DVK_CONFIG $bin/migrate-cli --node node1 ps"
  read -r -p "press Enter to stop the cluster " _
fi

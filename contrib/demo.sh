#!/usr/bin/env bash
# The dvk demo: builds everything, starts a 3-node cluster on this machine
# (loopback ports, one runtime dir per node), runs a server under the shim on
# node1 and a client loop on node3, moves the server node1 -> node2 -> node3
# while the client runs, and shows the client never saw an error.
# Everything it starts is stopped when it ends.
#
#   bash contrib/demo.sh          # run the demo and exit
#   bash contrib/demo.sh --keep   # leave the cluster up until you press Enter
set -euo pipefail
cd "$(dirname "$0")/.."
keep=no; [ "${1:-}" = "--keep" ] && keep=yes

# The programs started below inherit only stdin/stdout/stderr: an fd this shell inherited (a
# pipe to whatever started it) could not follow a moved server, and the move would refuse it.
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] 2>/dev/null && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

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
echo "== a server under the shim on node1: endpoint kv:7000 of dc0, 8 MB of data (the DVS paper's test server)"
cc -O2 -o "$demo/move_server" tests/programs/move_server.c
cc -O2 -o "$demo/move_client" tests/programs/move_client.c
DVK_AGENT_SOCK=$demo/node1/run/agent.sock DVK_ENDPOINT=kv LD_PRELOAD=$bin/libdvkshim.so \
  "$demo/move_server" 7000 8 > "$demo/server.out" 2>&1 < /dev/null &
pids+=($!)
server=$!
for _ in $(seq 100); do "$bin/migrate-cli" --node node3 endpoints | grep -q kv:7000 && break; sleep 0.1; done
vpid=$("$bin/migrate-cli" --node node1 ps --json | python3 -c "import json,sys; print(next(p['vpid'] for p in json.load(sys.stdin) if p['pid']==$server))")
"$bin/migrate-cli" --node node3 ps

echo
echo "== a client under the shim on node3: 4000 requests with a random 4 KB block each, every reply checked"
DVK_AGENT_SOCK=$demo/node3/run/agent.sock LD_PRELOAD=$bin/libdvkshim.so \
  "$demo/move_client" kv.dc0.dvk 7000 8 4000 1 500 > "$demo/client.out" 2>&1 < /dev/null &
client=$!
pids+=($client)
wait_line() { # FILE PATTERN: waits (30 s at most) for a line of the client's output
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "timed out waiting for '$2' in $1:"; cat "$1"; exit 1
}
wait_line "$demo/client.out" '^progress 500'

echo
echo "== move it node1 -> node2 while the client runs (migrate-cli move $vpid node2, asked on node3)"
"$bin/migrate-cli" --node node3 move "$vpid" node2
wait_line "$demo/client.out" '^progress 2000'
echo
echo "== and on to node3, the client's own node"
"$bin/migrate-cli" --node node3 move "$vpid" node3
echo
"$bin/migrate-cli" --node node3 ps
# The server now runs on node3 (a new real pid there): stop it too at the end.
pids+=($("$bin/migrate-cli" --node node3 ps --json | python3 -c "import json,sys; print(next(p['pid'] for p in json.load(sys.stdin) if p['vpid']==$vpid))"))
wait "$client" && status=ok || status=FAILED
echo
echo "== the client: $status"
tail -n 2 "$demo/client.out"
echo "   (DONE means all 4000 replies and the server's whole 8 MB were checked byte for byte;"
echo "    max_gap_us is the longest the client waited for one reply, moves included)"
[ "$status" = ok ]

if [ "$keep" = yes ]; then
  echo
  echo "cluster config: $DVK_CONFIG — try: DVK_CONFIG=$DVK_CONFIG $bin/migrate-cli --node node1 ps"
  read -r -p "press Enter to stop the cluster " _
fi

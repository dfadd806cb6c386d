#!/usr/bin/env bash
# What replication costs, in one sitting: the same loads against one node and against a
# three-node cluster on this machine (all three processes on the same cores and disk, so every
# byte is received, written and synced three times here), fsync = always everywhere.
#   - a lone producer, one message per Send: ack latency p50 / p99
#   - 64 producers x 100-message batches of 1 KB: throughput, and broker CPU (user + system)
#     per GB of payload, summed over the three processes for the cluster
#   - failover: SIGKILL of the leader of a partition; the time until a Send through another
#     node succeeds again (each Send waits through the election up to its deadline; a Send in
#     flight at the kill may fail as unknown and is retried)
# The cluster's Sends go to the partition's leader (found with `sluice topics describe`), so
# forwarding is not counted; a second lone-producer run through a follower shows what it adds.
#   - burst: 10,000 concurrent seed-API Sends of 4 KB through one node (a follower of the
#     topic's partition: each is forwarded), all must be acknowledged
#   - idle: 100 partitions x 3 replicas doing nothing; each node's CPU over 20 s
#   - ids: Sends with ids against Sends without on the same cluster and partition leader,
#     interleaved ABBA (ROUNDS, default 2): 64 producers x 1 message per Send, and x 100-message
#     batches (`sluice-bench produce --ids`: every message a new 16-byte id)
#   - groups: a consumer group reading GROUP_MESSAGES (default 1,000,000: a run of about two
#     seconds; at 200,000 a run lasts a third of a second and single runs moved by ±20 %)
#     messages of 1 KB (stored beforehand), acking every response, through the partition's
#     leader; on the cluster the group's own Raft group commits each delivery's and each ack's
#     events before they count; then GROUP_RUNS (default 3) more groups on the same messages,
#     on one node through it, on the cluster through each node in turn, each run saying which
#     node leads its group (the node its member subscribed through forms a new group, so the
#     member is on its leader; a member relayed to another node costs about twice the CPU:
#     docs/benchmarks.md). Last, the median of each side's runs and their ratio.
#     (PERF_OUT=FILE: each of those runs is profiled, perf record of the three brokers into FILE.gK;
#     GROUP_MAX_IN_FLIGHT: the members' max_in_flight, the same on one node and three; default 0,
#     the brokers' own default, groups.default_in_flight)
# Usage: [N=messages for the lone producer, default 3000] [FAILOVERS=k, default 1]
#        [ONLY="lone batched failover burst idle ids groups", default all] benches/cluster.sh
# The cluster's timings are the defaults, or SLUICE_CLUSTER_ELECTION_TIMEOUT_MS and
# SLUICE_CLUSTER_HEARTBEAT_MS from the environment. CENV="NAME=value ..." is passed to the three
# cluster nodes only (an A/B of one setting against the single node's default).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${N:-3000}"
only="${ONLY:-lone batched failover burst idle ids groups}"
window="${GROUP_MAX_IN_FLIGHT:-0}"
want() { [[ " $only " == *" $1 "* ]]; }
cargo build --release --quiet --workspace
bench=target/release/sluice-bench
bin=target/release/sluice
root="${BENCH_DATA_DIR:-target/bench-data}/cluster"
rm -rf "$root"
mkdir -p "$root"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

cpu() { # summed user + system seconds of the given pids
  local t=0
  for p in "$@"; do
    t=$(awk -v t="$t" '{ sub(/.*\) /, ""); split($0, f, " "); print t + (f[12] + f[13]) / 100 }' "/proc/$p/stat")
  done
  echo "$t"
}

ticks() { # summed "user system" clock ticks of the given pids
  local u=0 k=0 a b
  for p in "$@"; do
    read -r a b < <(awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12], f[13] }' "/proc/$p/stat")
    u=$((u + a)); k=$((k + b))
  done
  echo "$u $k"
}

user_sys() { # user_sys "USER0 SYS0" "USER1 SYS1": the user and system seconds between them
  local a b c d
  read -r a b <<<"$1"; read -r c d <<<"$2"
  echo "user $(echo "scale=2; ($c - $a) / 100" | bc) s, system $(echo "scale=2; ($d - $b) / 100" | bc) s"
}

start() { # start DIR ENV...: a broker; sets $addr (its client address) and $pid
  local dir=$1; shift
  mkdir -p "$dir"
  rm -f "$dir.out"
  env "$@" RUST_LOG=warn "$bin" serve --data-dir "$dir" --listen 127.0.0.1:0 --http-listen "" \
    --fsync always >"$dir.out" 2>"$dir.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q listening "$dir.out" && break; sleep 0.1; done
  addr=$(sed -n 's/^sluice listening on //p' "$dir.out")
}

leader_addr() { # leader_addr TOPIC PARTITION ADDR...: the client address of the partition's leader
  local topic=$1 part=$2; shift 2
  local id=none
  for _ in $(seq 100); do
    id=$("$bin" topics describe "$topic" --broker "$1" | awk -v p="$part" '$1 == p { print $8 }')
    [ "$id" != none ] && break
    sleep 0.1
  done
  echo "${addrs[$((id - 1))]}"
}

node_of() { # node_of ADDR: the cluster node (1-3) serving client address ADDR
  printf '%s\n' "${addrs[@]}" | grep -nx "$1" | cut -d: -f1
}

group_leader() { # group_leader GROUP TOPIC ADDR: the node leading the consumer group, as ADDR says
  "$bin" cluster status --broker "$3" | awk -v g="$1" -v t="$2" '$1 == g && $2 == t { print $3 }'
}

group_rates=() # msg/s of each group run on the current side
consume_group() { # consume_group GROUP ADDR [COMMAND...]: one group reads topic grp through ADDR (under COMMAND)
  local group=$1 addr=$2 out
  shift 2
  out=$("$@" "$bench" consume --topic grp --group "$group" --max-in-flight "$window" --broker "$addr")
  echo "$out"
  group_rates+=("$(sed -n 's/.* = \([0-9]*\) msg\/s.*/\1/p' <<<"$out")")
}

median() { # median N...: the middle value (the lower middle of an even count)
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

groups() { # groups ADDR PIDS...: fills topic grp through ADDR, then one group reads it all
  local addr=$1; shift
  "$bench" produce --topic grp --producers 16 --connections 4 --batch 100 --messages "${GROUP_MESSAGES:-1000000}" \
    --broker "$addr" >/dev/null
  local c0 c1
  c0=$(cpu "$@")
  consume_group g "$addr"
  c1=$(cpu "$@")
  echo "brokers' CPU for the group's run: $(echo "$c1 - $c0" | bc) s"
}

if want lone || want batched || want groups; then
  echo "== one node"
  start "$root/single"
  single=$addr
  spid=$pid
  if want groups; then
    "$bin" topics create grp --partitions 1 --broker "$single" >/dev/null
    echo "-- groups"
    groups "$single" "$spid"
    for k in $(seq "${GROUP_RUNS:-3}"); do
      c0=$(cpu "$spid")
      consume_group "g$k" "$single"
      c1=$(cpu "$spid")
      echo "broker CPU: $(echo "$c1 - $c0" | bc) s"
    done
    one_node_rates=("${group_rates[@]}")
    group_rates=()
  fi
  if want lone; then
    "$bench" produce --topic lone --producers 1 --batch 1 --messages "$n" --broker "$single"
  fi
  if want batched; then
    c0=$(cpu "$spid"); t0=$(ticks "$spid")
    "$bench" produce --topic batched --producers 64 --connections 4 --batch 100 --messages 200000 --broker "$single"
    c1=$(cpu "$spid"); t1=$(ticks "$spid")
    echo "broker CPU for the batched run: $(echo "$c1 - $c0" | bc) s ($(user_sys "$t0" "$t1"))"
  fi
  kill -INT "$spid"; wait "$spid" || true
fi

echo "== three nodes"
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')
read -r p1 p2 p3 <<<"$ports"
peers="[\"1@127.0.0.1:$p1\",\"2@127.0.0.1:$p2\",\"3@127.0.0.1:$p3\"]"
addrs=()
cpids=()
for i in 1 2 3; do
  start "$root/node$i" SLUICE_CLUSTER_NODE_ID=$i SLUICE_CLUSTER_PEERS="$peers" ${CENV:-}
  addrs+=("$addr")
  cpids+=("$pid")
done
"$bin" topics create lone --broker "${addrs[0]}" >/dev/null
if want lone; then
  lead=$(leader_addr lone 0 "${addrs[0]}")
  "$bench" produce --topic lone --producers 1 --batch 1 --messages "$n" --broker "$lead"
  for a in "${addrs[@]}"; do
    if [ "$a" != "$lead" ]; then
      echo "-- through a follower (forwarded)"
      "$bench" produce --topic lone --producers 1 --batch 1 --messages "$n" --broker "$a"
      break
    fi
  done
fi
if want batched; then
  "$bin" topics create batched --broker "${addrs[0]}" >/dev/null
  lead=$(leader_addr batched 0 "${addrs[0]}")
  c0=$(cpu "${cpids[@]}"); t0=$(ticks "${cpids[@]}")
  "$bench" produce --topic batched --producers 64 --connections 4 --batch 100 --messages 200000 --broker "$lead"
  c1=$(cpu "${cpids[@]}"); t1=$(ticks "${cpids[@]}")
  echo "brokers' CPU for the batched run, summed over three: $(echo "$c1 - $c0" | bc) s ($(user_sys "$t0" "$t1"))"
fi

if want groups; then
  echo "-- groups"
  "$bin" topics create grp --partitions 1 --broker "${addrs[0]}" >/dev/null
  lead=$(leader_addr grp 0 "${addrs[0]}")
  groups "$lead" "${cpids[@]}"
  # The group is formed by the node its member subscribed through (docs/replication.md).
  echo "member connected to node $(node_of "$lead"), group led by node $(group_leader g grp "$lead")"
  # More groups on the same messages, each through another node in turn (each led there).
  for k in $(seq "${GROUP_RUNS:-3}"); do
    through=${addrs[$(((k - 1) % 3))]}
    c0=$(cpu "${cpids[@]}")
    profile=()
    if [ -n "${PERF_OUT:-}" ]; then
      # A sampled profile of the three brokers for this group's run (perf report -i FILE).
      profile=(perf record -q -F 999 -g -p "$(IFS=,; echo "${cpids[*]}")" -o "$PERF_OUT.g$k" --)
    fi
    consume_group "g$k" "$through" "${profile[@]}"
    c1=$(cpu "${cpids[@]}")
    echo "brokers' CPU: $(echo "$c1 - $c0" | bc) s; member connected to node $(node_of "$through"), group led by node $(group_leader "g$k" grp "$through")"
  done
  one=$(median "${one_node_rates[@]}")
  three=$(median "${group_rates[@]}")
  echo "groups, median of $((${GROUP_RUNS:-3} + 1)) runs each: one node $one msg/s, three nodes $three msg/s: $((100 * three / one)) % of one node"
fi

if want burst; then
  echo "== burst: 10,000 concurrent seed-API Sends of 4 KB through a follower of burst/0"
  "$bin" topics create burst --partitions 1 --broker "${addrs[0]}" >/dev/null
  lead=$(leader_addr burst 0 "${addrs[0]}")
  for a in "${addrs[@]}"; do [ "$a" != "$lead" ] && through=$a && break; done
  "$bench" burst --topic burst --sends 10000 --broker "$through"
fi

if want ids; then
  echo "== ids: Sends with ids against Sends without, interleaved, through ids/0's leader"
  "$bin" topics create ids --partitions 1 --broker "${addrs[0]}" >/dev/null
  lead=$(leader_addr ids 0 "${addrs[0]}")
  for round in $(seq "${ROUNDS:-2}"); do
    # ABBA: the log (and the id index) grow through the run; alternating which goes first
    # keeps that growth out of the ratio.
    order="plain ids"
    [ $((round % 2)) = 0 ] && order="ids plain"
    for mode in $order; do
      flag=()
      [ "$mode" = ids ] && flag=(--ids)
      echo "-- round $round, $mode: 64 producers x 1 message per Send"
      "$bench" produce --topic ids --producers 64 --connections 4 --batch 1 --messages 20000 \
        --broker "$lead" "${flag[@]}"
      echo "-- round $round, $mode: 64 producers x 100-message batches"
      "$bench" produce --topic ids --producers 64 --connections 4 --batch 100 --messages 200000 \
        --broker "$lead" "${flag[@]}"
    done
  done
fi

if want idle; then
  echo "== idle: 100 partitions x 3 replicas, nothing sent; each node's CPU over 20 s"
  "$bin" topics create idle --partitions 100 --broker "${addrs[0]}" >/dev/null
  sleep 5 # every group elected and settled
  declare -a before
  for i in 0 1 2; do before[$i]=$(cpu "${cpids[$i]}"); done
  sleep 20
  for i in 0 1 2; do
    echo "node $((i + 1)): $(echo "scale=1; ($(cpu "${cpids[$i]}") - ${before[$i]}) * 100 / 20" | bc) % of one core"
  done
fi

want failover || exit 0

for round in $(seq "${FAILOVERS:-1}"); do
  echo "== failover $round: SIGKILL of lone/0's leader; a Send through another node, retried on error"
  lead=$(leader_addr lone 0 "${addrs[0]}")
  for i in 0 1 2; do [ "${addrs[$i]}" = "$lead" ] && victim=$i; done
  through=${addrs[$(((victim + 1) % 3))]}
  echo warm | "$bin" produce --topic lone --partition 0 --broker "$through"
  t0=$(date +%s%N)
  kill -9 "${cpids[$victim]}"
  tries=0
  until echo after | "$bin" produce --topic lone --partition 0 --broker "$through" 2>/dev/null; do
    tries=$((tries + 1))
  done
  echo "a Send succeeded again $(( ($(date +%s%N) - t0) / 1000000 )) ms after the kill ($tries failed tries before)"
  # The victim comes back (same data, same identity) and catches up before the next round.
  wait "${cpids[$victim]}" 2>/dev/null || true
  start "$root/node$((victim + 1))" SLUICE_CLUSTER_NODE_ID=$((victim + 1)) SLUICE_CLUSTER_PEERS="$peers"
  addrs[$victim]=$addr
  cpids[$victim]=$pid
  sleep 3
done

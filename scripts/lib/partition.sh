# Partitions on one machine: between the Kafka brokers of scripts/brokers (which all listen on
# 127.0.0.1), and around a client process. Each broker process runs in its own net_cls cgroup
# (classid 0x0077000N), a client cut off runs in class 0x00770100, and nftables drops packets
# by class, so a cut link drops packets (no FIN, no RST) between exactly the processes named.
# Sourced by scripts/brokers; needs root, nftables and the net_cls cgroup controller (mounted
# here when missing). Without them, brokers run untagged and the partition commands refuse.

NET_CLS=/sys/fs/cgroup/net_cls
NFT_TABLE=reliable_partitions
CLIENT_CLASS=0x00770100

kafka_classid() { printf '0x0077%04x' "$1"; }

net_cls_ready() {
  [ -f "$NET_CLS/net_cls.classid" ] && return 0
  [ "$(id -u)" = 0 ] || return 1
  mkdir -p "$NET_CLS" 2>/dev/null && mount -t cgroup -o net_cls net_cls "$NET_CLS" 2>/dev/null
}

# kafka_tag N: puts broker N's process into its class (a no-op where classes are unavailable).
kafka_tag() {
  local n=$1 pid
  pid=$(kafka_pid "$n")
  net_cls_ready || return 0
  mkdir -p "$NET_CLS/rl-kafka$n"
  kafka_classid "$n" >"$NET_CLS/rl-kafka$n/net_cls.classid"
  echo "$pid" >"$NET_CLS/rl-kafka$n/cgroup.procs" 2>/dev/null || true
}

partition_ready() {
  command -v nft >/dev/null || die "partitions need nftables (apt-get install nftables)"
  net_cls_ready || die "partitions need root and the net_cls cgroup controller"
  nft list table inet "$NFT_TABLE" >/dev/null 2>&1 && return 0
  nft add table inet "$NFT_TABLE"
  nft add chain inet "$NFT_TABLE" out '{ type filter hook output priority 0; policy accept; }'
}

# kafka_partition N [--brokers-only]: cuts broker N off from the other brokers (replication,
# controller quorum, heartbeats) and, unless --brokers-only, from every client too.
kafka_partition() {
  local n=$1 scope=${2:-all} m own=() others=() classes=()
  kafka_check_node "$n"
  partition_ready
  for m in $(seq 1 "$(kafka_count)"); do
    grep -qx "$(kafka_pid "$m")" "$NET_CLS/rl-kafka$m/cgroup.procs" 2>/dev/null || kafka_tag "$m"
  done
  own=("$(kafka_port "$n")" "$(kafka_ctrl_port "$n")")
  for m in $(seq 1 "$(kafka_count)"); do
    [ "$m" = "$n" ] && continue
    others+=("$(kafka_port "$m")" "$(kafka_ctrl_port "$m")")
    classes+=("$(kafka_classid "$m")")
  done
  local chain=node$n
  if ! nft list chain inet "$NFT_TABLE" "$chain" >/dev/null 2>&1; then
    nft add chain inet "$NFT_TABLE" "$chain"
    nft add rule inet "$NFT_TABLE" out jump "$chain"
  fi
  nft flush chain inet "$NFT_TABLE" "$chain"
  local list_own list_others list_classes
  list_own=$(IFS=,; echo "${own[*]}")
  list_others=$(IFS=,; echo "${others[*]}")
  list_classes=$(IFS=,; echo "${classes[*]}")
  # N's requests to the other brokers, and theirs to N.
  nft add rule inet "$NFT_TABLE" "$chain" meta cgroup "$(kafka_classid "$n")" tcp dport "{ $list_others }" counter drop
  nft add rule inet "$NFT_TABLE" "$chain" meta cgroup "{ $list_classes }" tcp dport "{ $list_own }" counter drop
  if [ "$scope" != --brokers-only ]; then
    # Everything N sends, and everything anyone sends to N.
    nft add rule inet "$NFT_TABLE" "$chain" meta cgroup "$(kafka_classid "$n")" counter drop
    nft add rule inet "$NFT_TABLE" "$chain" tcp dport "{ $list_own }" counter drop
  fi
  log "Kafka broker $n cut off from the other brokers$([ "$scope" = --brokers-only ] || echo ' and every client')"
}

# kafka_heal [N]: restores broker N's links (every broker's without N).
kafka_heal() {
  nft list table inet "$NFT_TABLE" >/dev/null 2>&1 || return 0
  if [ -n "${1:-}" ]; then
    kafka_check_node "$1"
    nft flush chain inet "$NFT_TABLE" "node$1" 2>/dev/null || true
    log "Kafka broker $1 links restored"
  else
    nft delete table inet "$NFT_TABLE"
    log "every link restored"
  fi
}

# client_partition PID: cuts process PID (all its threads) off from every broker: whatever it
# sends is dropped, so its connections go silent without a reset on either side.
client_partition() {
  local pid=${1:-}
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || die "client-partition needs a live pid (got '$pid')"
  partition_ready
  mkdir -p "$NET_CLS/rl-client"
  echo "$CLIENT_CLASS" >"$NET_CLS/rl-client/net_cls.classid"
  echo "$pid" >"$NET_CLS/rl-client/cgroup.procs"
  client_ports "$pid" >"$DIR/client-ports"
  if ! nft list chain inet "$NFT_TABLE" client >/dev/null 2>&1; then
    nft add chain inet "$NFT_TABLE" client
    nft add rule inet "$NFT_TABLE" out jump client
  fi
  nft flush chain inet "$NFT_TABLE" client
  nft add rule inet "$NFT_TABLE" client meta cgroup "$CLIENT_CLASS" counter drop
  log "process $pid cut off from every broker"
}

# client_ports PID: the local ports of process PID's established TCP connections.
client_ports() {
  local pid=$1 inodes
  inodes=$(ls -l "/proc/$pid/fd" 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p' | sort -u)
  # Established sockets (state 01) by inode; the local port is hex in the table.
  awk -v want=" $(echo $inodes) " 'FNR > 1 && $4 == "01" && index(want, " " $10 " ") {
      split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    while read -r hex; do echo $((16#$hex)); done
}

# client_reset PID: resets the TCP connections of process PID, on the ports it had when it was
# cut off and on those it has now, as a NAT or firewall that forgot them during an outage
# answers them: what was written into them and not yet delivered is gone. Every connected
# state counts: a socket the process has closed since (or left behind when it exited) sits in
# FIN_WAIT with its unsent data, which the kernel would otherwise deliver after the heal.
client_reset() {
  local pid=${1:-} port n=0
  [[ "$pid" =~ ^[0-9]+$ ]] || die "client-reset needs the client's pid"
  for port in $( (cat "$DIR/client-ports" 2>/dev/null; client_ports "$pid") | sort -u); do
    ss -K -t state connected "sport = :$port" >/dev/null 2>&1 && n=$((n + 1))
  done
  log "connections of process $pid reset ($n local port(s))"
}

# client_heal: lets the client cut off by client_partition talk again.
client_heal() {
  nft flush chain inet "$NFT_TABLE" client 2>/dev/null || true
  log "client links restored"
}

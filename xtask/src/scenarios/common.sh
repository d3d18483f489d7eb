# Always first: helpers, then what every scenario starts from (the kernel's
# ublk checked, three mock nodes with memory stores at $NODES, no device).
# Every scenario leaves no device behind.
set -u
# The reason is said again after the logs, so that a reader of the tail sees it.
fail() { echo "NETBLK-VM-FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; cat "$f"; done; echo "NETBLK-VM-FAIL (again, after the logs): $*"; echo "NETBLK-VM-RESULT: fail"; poweroff -f; }
# wait_dev FILE: prints the device a map printed to FILE, once it is a block device.
wait_dev() { for i in $(seq 100); do d=$(head -n1 "$1" 2>/dev/null); [ -n "$d" ] && [ -b "$d" ] && { echo "$d"; return; }; sleep 0.1; done; }
# wait_exit PID SECS: waits up to SECS for PID to exit; its status in $RC.
# Returns 1 if it still runs.
wait_exit() {
  for i in $(seq $(($2 * 10))); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$1" 2>/dev/null && return 1
  wait "$1"; RC=$?
  return 0
}
# wait_listening FILE...: returns once each node said it listens (or 5 s each).
wait_listening() { for f in "$@"; do for i in $(seq 50); do grep -q listening "$f" && break; sleep 0.1; done; done; }
# dir_nodes NAME "ARGS" PORT...: a mock node per port on 127.0.0.1 with a
# directory store /var/NAMEPORT (and ARGS), output in /tmp/NAMEPORT.out and
# .log, its pid in $pid_NAMEPORT; returns once all listen.
dir_nodes() {
  name=$1; extra=$2; shift 2
  for p in "$@"; do
    mkdir -p /var/$name$p
    netblk-mock-node --listen 127.0.0.1:$p --store dir:/var/$name$p $extra >/tmp/$name$p.out 2>/tmp/$name$p.log &
    eval "pid_$name$p=$!"
  done
  for p in "$@"; do wait_listening /tmp/$name$p.out; done
}
# restart_dir_node NAME "ARGS" PORT: starts that node again on its store
# (log in /tmp/NAMEPORTb.log) once the old one is gone.
restart_dir_node() {
  eval "old=\$pid_$1$3"
  wait $old 2>/dev/null
  netblk-mock-node --listen 127.0.0.1:$3 --store dir:/var/$1$3 $2 >/tmp/$1$3.out 2>/tmp/$1$3b.log &
  eval "pid_$1$3=$!"
  wait_listening /tmp/$1$3.out
}
# veth_netns NS NEAR FAR NET: a network namespace NS of the scenario's own,
# joined to this one by a veth pair: NEAR here at NET.1, FAR in NS at
# NET.2 (NET: three octets), both up, and NS's loopback up.
veth_netns() {
  ip-full netns add $1 || fail "ip-full netns add $1"
  ip-full link add $2 type veth peer name $3 || fail "no veth link"
  ip-full link set $3 netns $1
  ip-full addr add $4.1/24 dev $2
  ip-full link set $2 up
  ip-full -n $1 addr add $4.2/24 dev $3
  ip-full -n $1 link set $3 up
  ip-full -n $1 link set lo up
}
echo "== kernel $(uname -r)"
netblk features || fail "netblk features"
netblk ublk-check || fail "netblk ublk-check"
ls /dev/ublkc* /dev/ublkb* 2>/dev/null && fail "a device was left behind"

# Three mock nodes on loopback, a striped volume over them.
for p in 7001 7002 7003; do
  netblk-mock-node --listen 127.0.0.1:$p --store memory >/tmp/node$p.out 2>/tmp/node$p.log &
done
wait_listening /tmp/node7001.out /tmp/node7002.out /tmp/node7003.out
NODES=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003

# The guest side of `cargo xtask vm-bench` (after the settings the host
# writes above this: RUNTIME_MS, RAMP_MS, ROUNDS, SIZE_MB, QUEUES, CONNS,
# PASSES, TARGETS, WORKLOADS, NODE_PROCS and workload_args; for a sweep
# also sweep_maps).
#
# Per pass (store, null): start the servers, set every target up, then for
# each workload and round run fio on each target, one at a time (the order
# reverses every other round), then tear the pass down. Each run is reported
# on the console as base64 lines of fio's JSON (NETBLK-BENCH-DATA) and one
# NETBLK-BENCH-RUN line with the CPU figures; the host parses them.
set -u
# Kernel messages would land in the middle of the report lines.
echo 1 > /proc/sys/kernel/printk
fail() { echo "NETBLK-BENCH-FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; tail -n 30 "$f"; done; echo "NETBLK-VM-RESULT: fail"; poweroff -f; }
# wait_dev FILE: prints the device a map printed to FILE, once it is a block device (30 s at most).
wait_dev() { for i in $(seq 300); do d=$(head -n1 "$1" 2>/dev/null); [ -n "$d" ] && [ -b "$d" ] && { echo "$d"; return; }; sleep 0.1; done; }
# wait_listening FILE...: returns once each node said it listens (or 10 s each).
wait_listening() { for f in "$@"; do for i in $(seq 100); do grep -q listening "$f" && break; sleep 0.1; done; done; }
NCPU=$(nproc)
echo "== vm-bench on $(uname -r), $NCPU vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
for t in fio netblk netblk-mock-node nbd-client nbd-server nbdkit; do command -v $t >/dev/null || fail "$t missing in the guest"; done

# fill DEVICE: write it whole once, so reads find data (1 MiB, depth 8).
fill() {
  fio --name=fill --filename="$1" --rw=write --bs=1M --iodepth=8 --direct=1 --ioengine=libaio >/tmp/fill.log 2>&1 || fail "filling $1"
}

# mq_map DEVICE: which CPUs submit to each of its blk-mq hardware queues.
mq_map() {
  m=""
  for q in /sys/block/${1#/dev/}/mq/*; do m="$m ${q##*/}:$(cat $q/cpu_list 2>/dev/null)"; done
  echo "hw queue:CPUs$m"
}

# map_netblk TARGET NODES QUEUES ZERO-COPY [REPLICAS]: a netblk device for TARGET.
map_netblk() {
  netblk map --volume "$pass-$1" --size ${SIZE_MB}M --nodes "$2" --queues "$3" --zero-copy "$4" \
      --replicas "${5:-1}" >/tmp/$1.out 2>/tmp/$1.log &
  echo $! > /tmp/pid.$1
  d=$(wait_dev /tmp/$1.out)
  [ -n "$d" ] || fail "netblk map for $1"
  echo "$d" > /tmp/dev.$1
  # "... data path: full zero copy device=/dev/ublkb0 ...": the words up to
  # the first field's name.
  echo "NETBLK-BENCH-PATH $pass $1 $(grep -o 'data path: [a-z ]*=' /tmp/$1.log | head -n1 | sed 's/data path: //; s/ [a-z_]*=$//') ($(mq_map $d))"
}

# connect_nbd TARGET DEVICE PORT CONNECTIONS: the kernel NBD client on
# DEVICE, to the server on PORT (export "bench"), with that many connections.
connect_nbd() {
  for i in $(seq 50); do
    nbd-client 127.0.0.1 "$3" "$2" -N bench -C "$4" >/tmp/nbd-client-$1.log 2>&1 && break
    sleep 0.2
  done
  for i in $(seq 50); do [ "$(cat /sys/block/${2#/dev/}/size)" -gt 0 ] && break; sleep 0.1; done
  [ "$(cat /sys/block/${2#/dev/}/size)" -gt 0 ] || fail "nbd-client for $1"
  echo "$2" > /tmp/dev.$1
  echo "NETBLK-BENCH-PATH $pass $1 kernel NBD client, $4 connection(s), $nbd_server ($(mq_map $2))"
}

# node_list N: the addresses of the pass's first N nodes, comma separated.
node_list() { l=""; for p in $(seq $1); do l="$l${l:+,}127.0.0.1:$((port + p))"; done; echo "$l"; }

setup_pass() {
  case $pass in
    store) store=memory; port=7100 ;;
    null) store=null; port=7200 ;;
    sweep) store=null; port=7300 ;;
  esac
  for p in $(seq $NODE_PROCS); do
    netblk-mock-node --listen 127.0.0.1:$((port + p)) --store $store >/tmp/node-${pass}$p.out 2>/tmp/node-${pass}$p.log &
    echo $! > /tmp/pid.node-${pass}$p
  done
  for p in $(seq $NODE_PROCS); do
    wait_listening /tmp/node-${pass}$p.out
    grep -q listening /tmp/node-${pass}$p.out || fail "mock node $p ($store) did not start"
  done
  if [ $pass = sweep ]; then sweep_maps; return; fi
  one=127.0.0.1:$((port + 1))
  three=127.0.0.1:$((port + 2)),127.0.0.1:$((port + 3)),127.0.0.1:$((port + 4))
  map_netblk netblk-1n1q-copy $one 1 off
  map_netblk netblk-1n1q-auto $one 1 auto
  map_netblk netblk-3n2q-copy $three $QUEUES off
  map_netblk netblk-3n2q-auto $three $QUEUES auto
  six=$(node_list 10 | cut -d, -f5-10)
  map_netblk netblk-3c2r-auto $six $QUEUES auto 2
  if [ $pass = store ]; then
    # nbd-server (forks a process per connection) exporting a tmpfs file.
    mkdir -p /tmp/nbd && rm -f /tmp/nbd/export.img
    dd if=/dev/zero of=/tmp/nbd/export.img bs=1M count=0 seek=$SIZE_MB 2>/dev/null
    printf '[generic]\n    listenaddr = 127.0.0.1\n    port = 10809\n[bench]\n    exportname = /tmp/nbd/export.img\n' > /tmp/nbd-server.conf
    nbd-server -C /tmp/nbd-server.conf -p /tmp/nbd-server.pid >/tmp/nbd-server.log 2>&1 || fail "nbd-server"
    nbd_port=10809
    nbd_server="nbd-server $(nbd-server -V 2>&1 | grep -o '[0-9][0-9.]*' | head -n1), file on tmpfs"
  else
    # nbdkit's null plugin: writes are dropped, reads return zeroes.
    nbdkit -f -i 127.0.0.1 -p 10810 null size=${SIZE_MB}M >/tmp/nbdkit.log 2>&1 &
    echo $! > /tmp/pid.nbdkit
    nbd_port=10810
    nbd_server="nbdkit $(nbdkit --version 2>&1 | grep -o '[0-9][0-9.]*' | head -n1) null plugin"
  fi
  connect_nbd nbd-1conn /dev/nbd0 $nbd_port 1
  connect_nbd nbd-${CONNS}conn /dev/nbd1 $nbd_port $CONNS
  echo /dev/ram0 > /tmp/dev.brd
  echo "NETBLK-BENCH-PATH $pass brd RAM disk"
  if [ $pass = store ]; then
    # Both NBD devices share the export file: filling one fills both.
    for t in netblk-1n1q-copy netblk-1n1q-auto netblk-3n2q-copy netblk-3n2q-auto netblk-3c2r-auto nbd-1conn; do fill "$(cat /tmp/dev.$t)"; done
  fi
}

teardown_pass() {
  if [ $pass != sweep ]; then
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    nbd-client -d /dev/nbd1 >/dev/null 2>&1
  fi
  if [ $pass = store ]; then kill "$(cat /tmp/nbd-server.pid)" 2>/dev/null; fi
  if [ $pass = null ]; then kill "$(cat /tmp/pid.nbdkit)"; wait "$(cat /tmp/pid.nbdkit)" 2>/dev/null; fi
  for t in $TARGETS; do
    case $t in netblk-*) ;; *) continue ;; esac
    kill -INT "$(cat /tmp/pid.$t)"; wait "$(cat /tmp/pid.$t)" || fail "netblk daemon for $t exited with an error"
  done
  for p in $(seq $NODE_PROCS); do kill "$(cat /tmp/pid.node-${pass}$p)"; wait "$(cat /tmp/pid.node-${pass}$p)" 2>/dev/null; done
  rm -f /tmp/nbd/export.img
  ls /dev/ublkb* 2>/dev/null && fail "a netblk device was left behind"
}

# thread_ticks PID...: "tid ticks switches" for every thread of those
# processes (user and system clock ticks; the name in stat may hold
# spaces; voluntary and involuntary context switches).
thread_ticks() {
  for p in "$@"; do
    for t in /proc/$p/task/*; do
      [ -r $t/stat ] && echo "${t##*/} $(sed 's/.*) //' $t/stat | awk '{print $12 + $13}') $(awk '/ctxt_switches/ {s += $2} END {print s + 0}' $t/status 2>/dev/null)"
    done
  done
}
# tick_delta BEFORE AFTER: "sum busiest switches" of the threads' deltas.
tick_delta() {
  awk 'FILENAME == ARGV[1] {a[$1] = $2; c[$1] = $3; next} {d = $2 - a[$1]; s += d; if (d > m) m = d; w += $3 - c[$1]} END {print s + 0, m + 0, w + 0}' "$1" "$2"
}

# server_pids TARGET: the processes serving TARGET: the pass's mock nodes
# for netblk; for NBD, nbd-server's (it forks one per connection) or nbdkit.
server_pids() {
  case $1 in
    netblk-*) cat /tmp/pid.node-${pass}* 2>/dev/null ;;
    nbd-*)
      if [ $pass = store ]; then
        for c in /proc/[0-9]*/comm; do
          [ "$(cat $c 2>/dev/null)" = nbd-server ] && { d=${c%/comm}; echo ${d#/proc/}; }
        done
      else
        cat /tmp/pid.nbdkit
      fi ;;
  esac
}

# run_fio TARGET WORKLOAD ROUND: one measured fio run and its report lines,
# with the CPU ticks of the whole guest, of the target's netblk daemon
# (all threads, and its busiest thread), of its servers and of softirqs.
id=0
run_fio() {
  id=$((id + 1))
  dev=$(cat /tmp/dev.$1)
  rm -f /tmp/fio.json
  client=""; [ -f /tmp/pid.$1 ] && client=$(cat /tmp/pid.$1)
  nodes=$(server_pids $1)
  thread_ticks $client > /tmp/client.0; thread_ticks $nodes > /tmp/nodes.0
  read -r _ u n s i w q sq st _ < /proc/stat
  b0=$((u + n + s + q + sq + st)); t0=$((u + n + s + i + w + q + sq + st)); sq0=$sq
  x0=$(awk '/^ctxt/ {print $2}' /proc/stat)
  # A run that does not end within a minute of its time is a hang: say
  # what the device and its daemon look like, then give up.
  timeout $(( (RUNTIME_MS + RAMP_MS) / 1000 + 60 )) \
  fio --name=bench --filename="$dev" --direct=1 --ioengine=libaio --time_based \
    --runtime=${RUNTIME_MS}ms --ramp_time=${RAMP_MS}ms --norandommap --randrepeat=0 \
    --lat_percentiles=1 $(workload_args $2) --output-format=json --output=/tmp/fio.json >/tmp/fio.log 2>&1
  rc=$?
  if [ $rc -eq 124 ]; then
    echo "NETBLK-BENCH-HANG $1 $2 round $3: in flight (read write) $(cat /sys/block/${dev#/dev/}/inflight 2>/dev/null)"
    netblk status 2>&1 | sed 's/^/    status: /'
    dmesg | tail -n 20 | sed 's/^/    dmesg: /'
    fail "fio on $1 ($2, round $3) did not finish"
  fi
  read -r _ u n s i w q sq st _ < /proc/stat
  b1=$((u + n + s + q + sq + st)); t1=$((u + n + s + i + w + q + sq + st))
  x1=$(awk '/^ctxt/ {print $2}' /proc/stat)
  thread_ticks $client > /tmp/client.1; thread_ticks $nodes > /tmp/nodes.1
  set -- "$@" $(tick_delta /tmp/client.0 /tmp/client.1) $(tick_delta /tmp/nodes.0 /tmp/nodes.1)
  # One line of JSON (fio writes no string across lines), then base64 lines.
  sed 's/^[[:space:]]*//' /tmp/fio.json 2>/dev/null | tr -d '\n' > /tmp/fio.compact
  base64 /tmp/fio.compact | awk -v id=$id '{ print "NETBLK-BENCH-DATA " id " " NR " " $0 }'
  echo "NETBLK-BENCH-RUN $id $pass $1 $2 $3 rc=$rc busy=$((b1 - b0)) total=$((t1 - t0)) ncpu=$NCPU bytes=$(wc -c < /tmp/fio.compact) client=$4 top=$5 nodes=$7 sirq=$((sq - sq0)) ctxt=$((x1 - x0)) cswc=$6 cswn=$9"
  if [ $rc -ne 0 ]; then tail -n 5 /tmp/fio.log | sed 's/^/    fio: /'; fi
}

echo "NETBLK-BENCH-PLAN passes=$PASSES rounds=$ROUNDS runtime_ms=$RUNTIME_MS ramp_ms=$RAMP_MS"
fill /dev/ram0
for pass in $PASSES; do
  echo "== pass $pass: setting up"
  setup_pass
  echo "== pass $pass: measuring"
  for wl in $WORKLOADS; do
    r=1
    while [ $r -le $ROUNDS ]; do
      order=$TARGETS
      # Every other round runs the targets in reverse, so no target always
      # follows the same one.
      if [ $((r % 2)) -eq 0 ]; then order=$(echo $TARGETS | tr ' ' '\n' | sed '1!G;h;$!d'); fi
      for t in $order; do run_fio $t $wl $r; done
      r=$((r + 1))
    done
  done
  teardown_pass
done
echo "NETBLK-BENCH-DONE"
echo "NETBLK-VM-RESULT: pass"

# Trust (issue 9): deep queues keep send chains whole; every wait is
# bounded when a node stops reading; a flush never claims durability a node
# lost.
for p in 7201 7202 7203; do
  netblk-mock-node --listen 127.0.0.1:$p --store memory >/tmp/tnode$p.out 2>/tmp/tnode$p.log &
  eval "TNODE$p=$!"
done
wait_listening /tmp/tnode7201.out /tmp/tnode7202.out /tmp/tnode7203.out
TNODES=127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203

# 1. fio asks for more than the queue holds, at a small and a large depth,
#    with IOs split into many pieces (4 KiB stripe unit): data verified.
for d in 4:64 512:1024; do
  depth=${d%%:*}; iodepth=${d##*:}
  netblk map --volume deep$depth --size 256M --nodes $TNODES --stripe-unit 4K --depth $depth >/tmp/deep.out 2>/tmp/deep.log &
  MAP=$!
  DEV=$(wait_dev /tmp/deep.out)
  [ -b "$DEV" ] || fail "no device for --depth $depth"
  fio --name=deep --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=$iodepth \
      --rw=randwrite --bsrange=4k-512k --size=64M --verify=crc32c --verify_fatal=1 \
      --do_verify=1 --randrepeat=0 --output=/tmp/deep$depth.log >/dev/null 2>&1 || fail "fio verify at iodepth $iodepth over --depth $depth"
  grep -q "err= 0" /tmp/deep$depth.log || fail "fio reported errors at iodepth $iodepth over --depth $depth"
  kill -TERM $MAP; wait $MAP || fail "map --depth $depth exited with an error"
  echo "ublk: --depth $depth, fio iodepth $iodepth, 4k-512k over a 4 KiB stripe unit: verify clean"
done

# 2. A node stops reading (SIGSTOP) under 1 MiB writes at depth 16: every
#    write ends within --io-timeout + 1 s (here with emulation slack), then
#    IO works again once it goes on.
# Two nodes: the stopped one is owed half of the 16 MiB in flight, more than
# the sockets take, so sends to it stall.
netblk map --volume stop --size 256M --nodes 127.0.0.1:7201,127.0.0.1:7202 --io-timeout 5 --node-down-timeout 120 >/tmp/stop.out 2>/tmp/stop.log &
MAP=$!
DEV=$(wait_dev /tmp/stop.out)
[ -b "$DEV" ] || fail "no device for the stopped-node volume"
fio --name=stop --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=64 --rw=write \
    --bs=1M --size=200M --time_based --runtime=120 --output=/tmp/stopfio.log >/dev/null 2>&1 &
FIO=$!
sleep 2
kill -0 $FIO 2>/dev/null || fail "fio ended before the node was stopped"
kill -STOP $TNODE7202
T0=$(date +%s)
# Bounded here too: without the fix fio itself hangs in the block layer.
for i in $(seq 200); do kill -0 $FIO 2>/dev/null || break; sleep 0.1; done
kill -0 $FIO 2>/dev/null && fail "fio still waits $(($(date +%s) - T0)) s after the node was stopped (io timeout 5 s)"
wait $FIO && fail "fio went on with a stopped node"
grep -qi "input/output error" /tmp/stopfio.log || fail "writes to a stopped node did not fail with EIO"
# fio exits at its first error, without waiting for the rest (a process's
# exit does not wait for its AIO): the device's in-flight count tells when
# every write has ended.
INFLIGHT=/sys/block/${DEV#/dev/}/inflight
for i in $(seq 300); do
  set -- $(cat $INFLIGHT)
  [ "$1" = 0 ] && [ "$2" = 0 ] && break
  sleep 0.1
done
T1=$(date +%s)
[ "$1" = 0 ] && [ "$2" = 0 ] || fail "writes to a stopped node still in flight $((T1 - T0)) s after the stop: $(cat $INFLIGHT)"
[ $((T1 - T0)) -le 9 ] || fail "writes to a stopped node took $((T1 - T0)) s to end (io timeout 5 s)"
kill -CONT $TNODE7202
dd if=/dev/urandom of=/tmp/sdata bs=1M count=16 2>/dev/null
OK=
for i in $(seq 40); do
  dd if=/tmp/sdata of="$DEV" bs=1M count=16 oflag=direct 2>/dev/null && OK=1 && break
  sleep 0.5
done
[ -n "$OK" ] || fail "the device did not work again after the node went on"
dd if="$DEV" of=/tmp/sback bs=1M count=16 iflag=direct 2>/dev/null || fail "read after the node went on"
cmp /tmp/sdata /tmp/sback || fail "data after the node went on differs"
kill -TERM $MAP; wait $MAP || fail "the stopped-node map exited with an error"
echo "ublk: a node stopped under 1 MiB writes at depth 64: EIO, nothing in flight $((T1 - T0)) s after the stop (io timeout 5 s); works again after SIGCONT"

# 3. Nodes with a volatile cache: one is killed after acknowledging writes,
#    before a flush, and restarted: the flush (fdatasync) fails with EIO,
#    once; without the crash it succeeds.
dir_nodes vnode --volatile-cache 7301 7302 7303
netblk map --volume cache --size 128M --nodes 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 >/tmp/cache.out 2>/tmp/cache.log &
MAP=$!
DEV=$(wait_dev /tmp/cache.out)
[ -b "$DEV" ] || fail "no device for the volatile-cache volume"
dd if=/dev/urandom of="$DEV" bs=1M count=32 oflag=direct 2>/dev/null || fail "write (volatile cache)"
dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/dev/null || fail "fdatasync without a crash"
dd if=/dev/urandom of="$DEV" bs=1M count=32 oflag=direct 2>/dev/null || fail "second write (volatile cache)"
kill -KILL $pid_vnode7302
restart_dir_node vnode --volatile-cache 7302
dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/tmp/fsync.err && fail "fdatasync succeeded after a node lost acknowledged writes"
grep -qi "input/output error" /tmp/fsync.err || { cat /tmp/fsync.err; fail "the lost flush is not EIO"; }
dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/dev/null || fail "the next fdatasync (reported once)"
kill -TERM $MAP; wait $MAP || fail "the volatile-cache map exited with an error"
echo "ublk: a volatile-cache node killed between write and flush: fdatasync EIO (once); without a crash: ok"

# 4. Durability is the device's, not a queue's (issue 21): two queues; a
#    write through queue 0 (CPU 0), the node loses its cache, a flush
#    through queue 1 (CPU 1) fails with EIO, once.
PIN0=; PIN1=
if command -v taskset >/dev/null 2>&1; then PIN0="taskset -c 0"; PIN1="taskset -c 1"; fi
netblk map --volume cache2 --size 128M --queues 2 --nodes 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 >/tmp/cache2.out 2>/tmp/cache2.log &
MAP=$!
DEV=$(wait_dev /tmp/cache2.out)
[ -b "$DEV" ] || fail "no device for the two-queue volatile-cache volume"
$PIN0 dd if=/dev/urandom of="$DEV" bs=1M count=32 oflag=direct 2>/dev/null || fail "write through queue 0"
kill -KILL $pid_vnode7302
restart_dir_node vnode --volatile-cache 7302
$PIN1 dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/tmp/fsync2.err && fail "a flush through queue 1 succeeded over writes queue 0 had acknowledged and the node lost"
grep -qi "input/output error" /tmp/fsync2.err || { cat /tmp/fsync2.err; fail "the lost flush through queue 1 is not EIO"; }
$PIN0 dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/dev/null || fail "queue 0's next flush (reported once for the device)"
kill -TERM $MAP; wait $MAP || fail "the two-queue volatile-cache map exited with an error"
echo "ublk: two queues, a write through one, the node loses its cache, a flush through the other: EIO (once for the device)${PIN0:+ (queues pinned by CPU)}"

# 5. ...and it survives the daemon (issue 21): acknowledged writes, the
#    daemon killed, the node loses its cache while no daemon serves; the
#    recovered daemon's first flush fails (the record kept the node's
#    incarnation), once.
netblk map --volume cache3 --size 128M --queues 2 --nodes 127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303 >/tmp/cache3.out 2>/tmp/cache3.log &
MAP=$!
DEV=$(wait_dev /tmp/cache3.out)
[ -b "$DEV" ] || fail "no device for the recovered volatile-cache volume"
dd if=/dev/urandom of="$DEV" bs=1M count=32 oflag=direct 2>/dev/null || fail "write before the daemon dies"
grep -q "^durability .*:1:" /run/netblk/ublk${DEV#/dev/ublkb} || { cat /run/netblk/ublk${DEV#/dev/ublkb}; fail "the record does not keep the nodes' durability"; }
kill -KILL $MAP; wait $MAP 2>/dev/null
kill -KILL $pid_vnode7302
restart_dir_node vnode --volatile-cache 7302
netblk map --recover "$DEV" >/tmp/cache3rec.out 2>/tmp/cache3rec.log &
MAP=$!
wait_dev /tmp/cache3rec.out >/dev/null
grep -q "recovered $DEV" /tmp/cache3rec.log || { cat /tmp/cache3rec.log; fail "the volatile-cache device was not recovered"; }
dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/tmp/fsync3.err && fail "the recovered daemon's flush succeeded over writes the node lost while no daemon served"
grep -qi "input/output error" /tmp/fsync3.err || { cat /tmp/fsync3.err; fail "the lost flush after the recovery is not EIO"; }
dd if=/dev/zero of="$DEV" bs=4k count=0 conv=notrunc,fsync 2>/dev/null || fail "the next flush after the recovery (reported once)"
netblk unmap "$DEV" >/tmp/cache3unmap.out 2>&1 || { cat /tmp/cache3unmap.out; fail "unmap of the recovered volatile-cache device"; }
wait $MAP || fail "the recovered volatile-cache daemon exited with an error"
echo "ublk: the node lost its cache while no daemon served: the recovered daemon's first flush EIO (the record's incarnations), once"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

# Reliability. Nodes with directory stores, so that one can be restarted.
dir_nodes rnode "" 7101 7102 7103
RNODES=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
netblk map --volume rel --size 512M --nodes $RNODES --stripe-unit 64K --queues 2 --node-down-timeout 3 >/tmp/rel.out 2>/tmp/rel.log &
MAP=$!
DEV=$(wait_dev /tmp/rel.out)
[ -b "$DEV" ] || fail "no device for the reliability volume"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4 (reliability)"
mkdir -p /mnt && mount -t ext4 "$DEV" /mnt || fail "mount (reliability)"
# fio writes at a bounded rate (so it is still writing when the daemon
# dies), then verifies every block.
fio_on_ext4() {
  fio --name=$1 --directory=/mnt --ioengine=libaio --direct=1 --iodepth=16 \
      --rw=randwrite --bsrange=4k-256k --size=48M --rate=12m --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/$1.log >/dev/null 2>&1
}

# 1. The daemon is killed -9 mid-workload and recovered: no error.
fio_on_ext4 kill9 &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the daemon was killed"
kill -KILL $MAP
sleep 0.5
netblk list >/tmp/list2.out || fail "netblk list (dead daemon)"
grep -q "$DEV *rel .*needs-recovery" /tmp/list2.out || { cat /tmp/list2.out; fail "list does not show needs-recovery"; }
netblk map --recover "$DEV" >/tmp/rec.out 2>/tmp/rec.log &
MAP=$!
# A recovery that fails leaves fio's IO held for good: fail with the logs
# instead of waiting for the guest's timeout.
for i in $(seq 1200); do
  grep -q "recovered $DEV" /tmp/rec.log && break
  kill -0 $MAP 2>/dev/null || fail "map --recover exited without recovering"
  sleep 0.1
done
grep -q "recovered $DEV" /tmp/rec.log || fail "map --recover did not recover within 120 s"
wait_exit $FIO 120 || fail "fio still waits 120 s after the recovery"
[ "$RC" -eq 0 ] || fail "fio across daemon kill -9 and recovery"
grep -q "err= 0" /tmp/kill9.log || fail "fio reported errors across the daemon restart"
grep -q "recovered $DEV" /tmp/rec.log || fail "recovery did not say so"
grep -q "data path: $EXPECT" /tmp/rec.log || fail "recovered with another data path"
netblk list >/tmp/list3.out || fail "netblk list (recovered)"
grep -q "$DEV *rel .*live" /tmp/list3.out || { cat /tmp/list3.out; fail "list does not show the recovered device live"; }
netblk map --recover "$DEV" >/tmp/rec2.out 2>/tmp/rec2.log && fail "recovering a served device succeeded"
grep -q "still running" /tmp/rec2.log || fail "recovering a served device is not a clear error"
echo "ublk: daemon kill -9 during fio on ext4, map --recover: fio verify clean"

# 2. A node is killed and restarted mid-workload: no error.
fio_on_ext4 nodekill &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the node was killed"
kill -KILL $pid_rnode7102
sleep 1
restart_dir_node rnode "" 7102 &
wait $FIO || fail "fio across a node kill and restart"
grep -q "err= 0" /tmp/nodekill.log || fail "fio reported errors across a node restart"
umount /mnt || fail "umount (reliability)"
e2fsck -fn "$DEV" >/tmp/fsck2.log 2>&1 || fail "e2fsck -fn after the daemon and node restarts"
echo "ublk: node kill -9 and restart during fio on ext4: fio verify clean; e2fsck -fn clean"

# 3. A node down past --node-down-timeout (3 s): EIO within the bound,
#    then the device works again once the node is back.
kill -KILL $pid_rnode7103
T0=$(date +%s)
fio --name=down --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=8 --rw=write \
    --bs=1M --size=16M --output=/tmp/down.log >/dev/null 2>&1 && fail "IO to a dead node succeeded"
T1=$(date +%s)
grep -qi "input/output error" /tmp/down.log || fail "IO to a dead node did not fail with EIO"
[ $((T1 - T0)) -le 12 ] || fail "EIO took $((T1 - T0)) s with a 3 s node-down timeout"
restart_dir_node rnode "" 7103
dd if=/dev/urandom of=/tmp/rdata bs=1M count=16 2>/dev/null
OK=
for i in $(seq 40); do
  sleep 0.5
  dd if=/tmp/rdata of="$DEV" bs=1M count=16 oflag=direct 2>/dev/null && OK=1 && break
done
[ -n "$OK" ] || fail "the device did not work again after the node came back"
dd if="$DEV" of=/tmp/back2 bs=1M count=16 iflag=direct 2>/dev/null || fail "read after the node came back"
cmp /tmp/rdata /tmp/back2 || fail "data after the node came back differs"
echo "ublk: node down past its timeout: EIO after $((T1 - T0)) s (bound 12 s); usable again once back"
netblk unmap "$DEV" >/tmp/unmap3.out 2>&1 || { cat /tmp/unmap3.out; fail "unmap of the recovered device"; }
wait $MAP || fail "the recovered daemon exited with an error"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

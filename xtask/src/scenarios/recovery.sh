# Recovery never fences out a live daemon (it waits for the kernel's word
# that the old daemon is gone before it opens a node session); a queue that
# fails makes the daemon exit, leaving the device for `map --recover`.
netblk map --volume live --size 256M --nodes $NODES --queues 2 >/tmp/live.out 2>/tmp/live.log &
LIVE=$!
DEV=$(wait_dev /tmp/live.out)
[ -b "$DEV" ] || fail "no device for the live-daemon volume"
NODE_LOGS="/tmp/node7001.log /tmp/node7002.log /tmp/node7003.log"
STATE_DIR=${NETBLK_STATE_DIR:-/run/netblk}
# fenced_count: how many times the nodes fenced an older session so far.
fenced_count() { cat $NODE_LOGS | grep -c "older session fenced"; }
# --- (b) `map --recover` while the old daemon is alive is refused, and no
#         node session is opened (the nodes fence nobody).
F0=$(fenced_count)
dd if="$DEV" of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || fail "$DEV does not serve before the live-recovery checks"
# (b1) The record's pid is alive: refused at once, before ublk or a node is touched.
netblk map --recover "$DEV" >/tmp/p5live.out 2>/tmp/p5live.log && fail "recovering a device whose daemon runs succeeded"
grep -q "still running" /tmp/p5live.log || fail "recovering a live daemon's device is not a clear error"
# (b2) The pid check fooled, as after a pid reuse or from another pid
#      namespace: the record's start time no longer matches the daemon. The
#      kernel still says LIVE, so recovery waits and touches nothing; SIGTERM
#      ends the wait.
REC="$STATE_DIR/ublk${DEV#/dev/ublkb}"
[ -f "$REC" ] || fail "no record $REC for $DEV"
cp "$REC" /tmp/p5record.bak
sed 's/^pid_start .*/pid_start 1/' /tmp/p5record.bak > /tmp/p5record.fooled
cat /tmp/p5record.fooled > "$REC"   # in place: owner and mode stay
netblk map --recover "$DEV" >/tmp/p5fooled.out 2>/tmp/p5fooled.log &
FOOLED=$!
sleep 3
kill -0 $FOOLED 2>/dev/null || { cat /tmp/p5fooled.log; fail "recovery of a LIVE device did not wait for the kernel"; }
grep -q "is still LIVE: waiting up to 90 s" /tmp/p5fooled.log || fail "a waiting recovery does not say what it waits for"
dd if="$DEV" of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || fail "the live daemon stopped serving while a recovery waited"
kill -TERM $FOOLED
wait_exit $FOOLED 5 || fail "a waiting recovery ignored SIGTERM"
[ "$RC" -ne 0 ] || fail "an interrupted recovery exited 0"
grep -q "interrupted while waiting for the kernel to let go of the daemon of $DEV; nothing was started" /tmp/p5fooled.log \
  || { cat /tmp/p5fooled.log; fail "an interrupted recovery is not a clear error"; }
cat /tmp/p5record.bak > "$REC"
[ "$(fenced_count)" = "$F0" ] || fail "a recovery refused for a live daemon opened node sessions (the nodes fenced the live one)"
dd if="$DEV" of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null || fail "$DEV does not serve after the refused recoveries"
echo "ublk: map --recover of a live daemon's device: refused (pid check), and with the pid check fooled it waits on the kernel's LIVE, opening no node session"
# (To see the 90 s bound itself: leave the fooled recovery running; after
#  about 90 s it exits 1 with "is still LIVE after 90 s ... nothing was touched".)

# --- (a) A queue made to fail: the daemon exits non-zero naming it, leaves
#         the device quiesced, `list` says needs-recovery, and `map --recover`
#         brings IO back with the data intact.
# The queue fails 20 s after the map: the write below must be done by then
# (it is bounded; were the queue to fail under it, it would wait for a
# recovery this script only starts after it).
NETBLK_TEST_FAIL_QUEUE=1:20000 netblk map --volume p5 --size 256M --nodes $NODES --queues 2 >/tmp/p5.out 2>/tmp/p5.log &
P5=$!
P5DEV=$(wait_dev /tmp/p5.out)
[ -b "$P5DEV" ] || fail "no device for the queue-failure volume"
dd if=/dev/urandom of=/tmp/p5data bs=1M count=8 2>/dev/null
dd if=/tmp/p5data of="$P5DEV" bs=1M conv=fsync oflag=direct 2>/dev/null &
PRE=$!
wait_exit $PRE 15 || fail "the write before the queue failure took over 15 s"
[ "$RC" -eq 0 ] || fail "write before the queue failure"
wait_exit $P5 40 || fail "the daemon still runs 40 s after its queue 1 was due to fail"
[ "$RC" -eq 1 ] || { cat /tmp/p5.log; fail "the daemon exited with status $RC after a queue failed, not 1"; }
grep -q "NETBLK_TEST_FAIL_QUEUE: making queue 1 of $P5DEV fail now" /tmp/p5.log || fail "the test hook did not fire"
grep -q "netblk: $P5DEV: queue 1 failed: made to fail by the NETBLK_TEST_FAIL_QUEUE test hook" /tmp/p5.log \
  || { cat /tmp/p5.log; fail "the daemon did not name the failed queue and its cause"; }
grep -q "netblk map --recover $P5DEV" /tmp/p5.log || fail "the daemon did not say how to recover"
[ -b "$P5DEV" ] || fail "$P5DEV was deleted when its queue failed"
netblk list >/tmp/p5list.out || fail "netblk list (queue failed)"
grep -q "$P5DEV *p5 .*needs-recovery" /tmp/p5list.out || { cat /tmp/p5list.out; fail "list does not show needs-recovery after a queue failure"; }
# IO issued while no daemon serves is held (not failed) until the recovery.
dd if=/tmp/p5data of="$P5DEV" bs=1M seek=16 count=8 conv=fsync oflag=direct 2>/tmp/p5held.log &
HELD=$!
sleep 1
kill -0 $HELD 2>/dev/null || fail "IO to a device without a daemon did not wait for the recovery"
netblk map --recover "$P5DEV" >/tmp/p5rec.out 2>/tmp/p5rec.log &
P5=$!
wait_dev /tmp/p5rec.out >/dev/null
grep -q "recovered $P5DEV" /tmp/p5rec.log || { cat /tmp/p5rec.log; fail "recovery after a queue failure did not say so"; }
wait_exit $HELD 30 || fail "IO held across the queue failure did not finish after the recovery"
[ "$RC" -eq 0 ] || { cat /tmp/p5held.log; fail "IO held across the queue failure failed"; }
echo 3 > /proc/sys/vm/drop_caches
dd if="$P5DEV" of=/tmp/p5back bs=1M count=8 iflag=direct 2>/dev/null || fail "read after the recovery"
cmp /tmp/p5data /tmp/p5back || fail "data written before the queue failure differs after the recovery"
dd if="$P5DEV" of=/tmp/p5back2 bs=1M skip=16 count=8 iflag=direct 2>/dev/null || fail "read of the held write"
cmp /tmp/p5data /tmp/p5back2 || fail "the write held across the queue failure differs"
netblk list >/tmp/p5list2.out || fail "netblk list (recovered)"
grep -q "$P5DEV *p5 .*live" /tmp/p5list2.out || { cat /tmp/p5list2.out; fail "list does not show the recovered device live"; }
netblk unmap "$P5DEV" >/tmp/p5unmap.out 2>&1 || { cat /tmp/p5unmap.out; fail "unmap after the queue-failure recovery"; }
wait_exit $P5 60 || fail "the recovered daemon did not exit after unmap"
[ "$RC" -eq 0 ] || fail "the recovered daemon exited with an error"
echo "ublk: a queue made to fail: daemon exits 1 naming it, list says needs-recovery, IO held, map --recover: data intact"

netblk unmap "$DEV" >/tmp/liveunmap.out 2>&1 || { cat /tmp/liveunmap.out; fail "unmap of the live-daemon device"; }
wait $LIVE || fail "the live daemon exited with an error"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

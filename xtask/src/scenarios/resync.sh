# Resync (issue 23), R = 2 over two columns: a replica stopped for 10 s
# under fio verify leaves, comes back, catches up with only what it missed
# and rejoins; then its files equal its column's other member byte for
# byte. Scrub finds nothing on the volume, finds a byte flipped in one
# replica's file behind its node's back, and --repair fixes it. A
# memory-store replica restarted (its data gone) is rebuilt in full under
# fio verify. `netblk replace` under fio verify moves a member to a new
# node, rebuilt in full; the old node is then killed and nothing notices.
# A daemon killed mid-catch-up is recovered and finishes it.
fio_slow() {
  fio --name=$1 --filename="$2" --ioengine=libaio --direct=1 --iodepth=8 \
      --rw=randwrite --bsrange=4k-256k --size=48M --rate=3m --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/$1.log >/dev/null 2>&1
}
# status_json DEV KEY: a number from the device's status.
status_num() {
  netblk status --json "$1" | grep -o "\"$2\":[0-9]*" | head -n1 | cut -d: -f2
}
# in_sync_again FILE: waits (30 s) until every column is whole again.
in_sync_again() {
  for i in $(seq 300); do
    netblk status >"$1" 2>&1
    grep -q "DEGRADED" "$1" || return 0
    sleep 0.1
  done
  return 1
}

# 1. Catch-up: column 1's second copy (7244) is stopped for 10 s.
dir_nodes rs "" 7241 7242 7243 7244
RS=127.0.0.1:7241,127.0.0.1:7242,127.0.0.1:7243,127.0.0.1:7244
netblk map --volume rsync --size 128M --nodes $RS --replicas 2 --replica-timeout 2 \
    --stripe-unit 64K --queues 2 >/tmp/rsync.out 2>/tmp/rsync.log &
MAP=$!
DEV=$(wait_dev /tmp/rsync.out)
[ -b "$DEV" ] || fail "no device for the resync volume"
fio_slow rsfio "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the replica was stopped"
kill -STOP $pid_rs7244
sleep 10
netblk status >/tmp/rsout.out 2>&1
grep -q "column 1 DEGRADED in sync \[1\]" /tmp/rsout.out || { cat /tmp/rsout.out; fail "the stopped replica did not leave"; }
kill -CONT $pid_rs7244
wait $FIO || fail "fio across a replica stopped for 10 s and caught up"
grep -q "err= 0" /tmp/rsfio.log || fail "fio reported errors across the catch-up"
in_sync_again /tmp/rsback.out || { cat /tmp/rsback.out; fail "the replica is not back in sync"; }
grep -q "catch-up started" /tmp/rsync.log || fail "no event for the catch-up's start"
grep -q "catch-up ended: back in sync" /tmp/rsync.log || fail "no event for the catch-up's end"
grep "catch-up started" /tmp/rsync.log | grep -q "rebuild=false" || { grep catch-up /tmp/rsync.log; fail "a catch-up was a rebuild"; }
COPIED=$(status_num "$DEV" resync_bytes)
# fio writes over its 48 MiB (24 MiB of each column's node offsets, every
# 1 MiB region of it written while the replica was out): the bound is
# 1.25 x that, and a full copy of the column would be 64 MiB.
[ -n "$COPIED" ] && [ "$COPIED" -gt 0 ] && [ "$COPIED" -le $((30 << 20)) ] \
    || fail "the catch-up copied $COPIED bytes (bound: 30 MiB, 1.25 x the 24 MiB written)"
echo "ublk: R = 2, a replica stopped 10 s under fio verify: no error, caught up ($COPIED bytes copied) and back in sync"
# Scrub: nothing differs; a flipped byte in 7244's file is found, repaired.
netblk scrub "$DEV" >/tmp/scrub0.out 2>&1 || { cat /tmp/scrub0.out; fail "scrub of an equal volume"; }
grep -q "0 differ" /tmp/scrub0.out || { cat /tmp/scrub0.out; fail "scrub reports differences on an equal volume"; }
printf '\377' | dd of=/var/rs7244/rsync.vol bs=1 seek=$((5 << 20)) conv=notrunc 2>/dev/null \
    || fail "cannot flip a byte"
cmp -s /var/rs7242/rsync.vol /var/rs7244/rsync.vol && fail "the flip changed nothing"
netblk scrub "$DEV" >/tmp/scrub1.out 2>&1 && { cat /tmp/scrub1.out; fail "scrub of a flipped volume exited 0"; }
grep -q "1 differ" /tmp/scrub1.out || { cat /tmp/scrub1.out; fail "scrub did not find the flipped byte"; }
netblk scrub --repair "$DEV" >/tmp/scrub2.out 2>&1 || { cat /tmp/scrub2.out; fail "scrub --repair"; }
grep -q "1 repaired" /tmp/scrub2.out || { cat /tmp/scrub2.out; fail "scrub --repair repaired nothing"; }
netblk status --json "$DEV" | grep -q '"scrub_mismatches":[1-9]' || fail "no scrub mismatch in status"
echo "ublk: scrub finds nothing on an equal volume, finds a flipped byte, --repair fixes it"
netblk unmap "$DEV" >/tmp/unmaprs.out 2>&1 || { cat /tmp/unmaprs.out; fail "unmap (resync)"; }
wait $MAP || fail "the resync daemon exited with an error"
for p in 7241 7242 7243 7244; do eval "kill \$pid_rs$p; wait \$pid_rs$p"; done
# Address i is column i % 2, row i / 2.
cmp /var/rs7241/rsync.vol /var/rs7243/rsync.vol || fail "column 0's replicas differ"
cmp /var/rs7242/rsync.vol /var/rs7244/rsync.vol || fail "column 1's replicas differ after catch-up and repair"
echo "ublk: the replicas are equal byte for byte after catch-up and repair"
rm -rf /var/rs724*

# 2. Rebuild: memory stores; 7254 is killed and started again empty.
for p in 7251 7252 7253 7254; do
  netblk-mock-node --listen 127.0.0.1:$p --store memory >/tmp/mem$p.out 2>/tmp/mem$p.log &
  eval "pid_mem$p=$!"
done
wait_listening /tmp/mem7251.out /tmp/mem7252.out /tmp/mem7253.out /tmp/mem7254.out
RM=127.0.0.1:7251,127.0.0.1:7252,127.0.0.1:7253,127.0.0.1:7254
netblk map --volume rebuilt --size 64M --nodes $RM --replicas 2 --replica-timeout 2 \
    --stripe-unit 64K --queues 2 >/tmp/rebuilt.out 2>/tmp/rebuilt.log &
MAP=$!
DEV=$(wait_dev /tmp/rebuilt.out)
[ -b "$DEV" ] || fail "no device for the rebuild volume"
fio_slow rbfio "$DEV" &
FIO=$!
sleep 1.5
kill -KILL $pid_mem7254
wait $pid_mem7254 2>/dev/null
netblk-mock-node --listen 127.0.0.1:7254 --store memory >/tmp/mem7254.out 2>/tmp/mem7254b.log &
pid_mem7254=$!
wait $FIO || fail "fio across a replica rebuilt"
grep -q "err= 0" /tmp/rbfio.log || fail "fio reported errors across the rebuild"
in_sync_again /tmp/rbback.out || { cat /tmp/rbback.out; fail "the restarted replica is not back in sync"; }
grep "catch-up started" /tmp/rebuilt.log | grep -q "rebuild=true" || { grep catch-up /tmp/rebuilt.log; fail "no rebuild"; }
COPIED=$(status_num "$DEV" resync_bytes)
[ "$COPIED" -ge $((32 << 20)) ] || fail "the rebuild copied $COPIED bytes, less than the column's 32 MiB"
netblk scrub "$DEV" >/tmp/scrub3.out 2>&1 || { cat /tmp/scrub3.out; fail "scrub after the rebuild"; }
grep -q "0 differ" /tmp/scrub3.out || { cat /tmp/scrub3.out; fail "the rebuilt replica differs"; }
echo "ublk: R = 2, a memory-store replica restarted under fio verify: no error, rebuilt in full ($COPIED bytes), scrub finds the replicas equal"
netblk unmap "$DEV" >/tmp/unmaprb.out 2>&1 || { cat /tmp/unmaprb.out; fail "unmap (rebuild)"; }
wait $MAP || fail "the rebuild daemon exited with an error"
for p in 7251 7252 7253 7254; do eval "kill \$pid_mem$p; wait \$pid_mem$p"; done

# 3. Replace: 7264 (column 1's second copy) by 7265 under fio verify.
dir_nodes rp "" 7261 7262 7263 7264 7265
RP=127.0.0.1:7261,127.0.0.1:7262,127.0.0.1:7263,127.0.0.1:7264
netblk map --volume moved --size 64M --nodes $RP --replicas 2 --replica-timeout 2 \
    --stripe-unit 64K --queues 2 >/tmp/moved.out 2>/tmp/moved.log &
MAP=$!
DEV=$(wait_dev /tmp/moved.out)
[ -b "$DEV" ] || fail "no device for the replace volume"
fio_slow rpfio "$DEV" &
FIO=$!
sleep 1.5
netblk replace "$DEV" --node 127.0.0.1:7264 --with 127.0.0.1:7265 >/tmp/replace.out 2>&1 \
    || { cat /tmp/replace.out; fail "netblk replace"; }
grep -q "127.0.0.1:7265 is in sync" /tmp/replace.out || { cat /tmp/replace.out; fail "replace did not wait for the new node"; }
wait $FIO || fail "fio across a replace"
grep -q "err= 0" /tmp/rpfio.log || fail "fio reported errors across the replace"
grep -q "member replaced" /tmp/moved.log || fail "no event for the replacement"
# The old node is not a member any more: killing it costs nothing.
kill -KILL $pid_rp7264
fio --name=rpafter --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite \
    --bs=64k --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output=/tmp/rpafter.log >/dev/null 2>&1 || fail "fio after the old node was killed"
grep -q "err= 0" /tmp/rpafter.log || fail "fio reported errors after the old node was killed"
netblk status >/tmp/rpstatus.out 2>&1
grep -q "DEGRADED" /tmp/rpstatus.out && { cat /tmp/rpstatus.out; fail "the old node was still a member"; }
grep -q "127.0.0.1:7265" /tmp/rpstatus.out || { cat /tmp/rpstatus.out; fail "status does not show the new node"; }
netblk unmap "$DEV" >/tmp/unmaprp.out 2>&1 || { cat /tmp/unmaprp.out; fail "unmap (replace)"; }
wait $MAP || fail "the replace daemon exited with an error"
for p in 7261 7262 7263 7265; do eval "kill \$pid_rp$p; wait \$pid_rp$p"; done
cmp /var/rp7262/moved.vol /var/rp7265/moved.vol || fail "column 1's replicas differ after the replace"
echo "ublk: R = 2, netblk replace under fio verify: no error, the new node rebuilt and equal byte for byte, the old one killed unnoticed"
rm -rf /var/rp726*

# 4. A catch-up across `map --recover`: the daemon is killed mid-copy; the
# recovered daemon (its --resync-rate kept in the device record) catches
# the member up and the data written while it was out reads back.
dir_nodes rc "" 7271 7272 7273 7274
RC4=127.0.0.1:7271,127.0.0.1:7272,127.0.0.1:7273,127.0.0.1:7274
netblk map --volume recov --size 64M --nodes $RC4 --replicas 2 --replica-timeout 2 \
    --stripe-unit 64K --queues 2 --resync-rate 2M >/tmp/recov.out 2>/tmp/recov.log &
MAP=$!
DEV=$(wait_dev /tmp/recov.out)
[ -b "$DEV" ] || fail "no device for the recovery volume"
dd if=/dev/urandom of=/tmp/rcdata bs=1M count=32 2>/dev/null
kill -STOP $pid_rc7274
dd if=/tmp/rcdata of="$DEV" bs=1M conv=fsync oflag=direct 2>/dev/null || fail "write while a replica is stopped"
netblk status >/tmp/rcout.out 2>&1
grep -q "column 1 DEGRADED" /tmp/rcout.out || { cat /tmp/rcout.out; fail "the stopped replica did not leave"; }
kill -CONT $pid_rc7274
for i in $(seq 100); do grep -q "catch-up started" /tmp/recov.log && break; sleep 0.1; done
grep -q "catch-up started" /tmp/recov.log || fail "no catch-up once the replica was continued"
# 16 MiB of column 1 to copy at 2 MiB/s: the daemon dies half way.
sleep 2
grep -q "catch-up ended" /tmp/recov.log && fail "a catch-up at 2 MiB/s ended within 2 s"
kill -KILL $MAP
wait $MAP 2>/dev/null
netblk map --recover "$DEV" >/tmp/recov2.out 2>/tmp/recov2.log &
MAP=$!
wait_dev /tmp/recov2.out >/dev/null
grep -q "recovered $DEV" /tmp/recov2.log || { cat /tmp/recov2.log; fail "the recovery did not say so"; }
in_sync_again /tmp/rcback.out || { cat /tmp/rcback.out; fail "the replica is not back in sync after the recovery"; }
ENDED=$(grep "catch-up ended: back in sync" /tmp/recov2.log | head -n1)
[ -n "$ENDED" ] || fail "the recovered daemon did not finish the catch-up"
BYTES=$(echo "$ENDED" | grep -o 'bytes=[0-9]*' | cut -d= -f2)
SECS=$(echo "$ENDED" | grep -o 'secs=[0-9]*' | cut -d= -f2)
# At the default 64 MiB/s it would take well under a second.
[ "$BYTES" -ge $((8 << 20)) ] && [ "$SECS" -ge 3 ] \
    || fail "the recovered catch-up copied $BYTES bytes in $SECS s: not at the recorded 2 MiB/s"
echo 3 > /proc/sys/vm/drop_caches
dd if="$DEV" of=/tmp/rcback bs=1M count=32 iflag=direct 2>/dev/null || fail "read after the recovered catch-up"
cmp /tmp/rcdata /tmp/rcback || fail "data written while the replica was out differs after the recovered catch-up"
# The guest's /tmp is memory: 64 MiB less for the scenarios after this one.
rm -f /tmp/rcdata /tmp/rcback
netblk unmap "$DEV" >/tmp/unmaprc.out 2>&1 || { cat /tmp/unmaprc.out; fail "unmap (recovered catch-up)"; }
wait $MAP || fail "the recovered daemon exited with an error"
for p in 7271 7272 7273 7274; do eval "kill \$pid_rc$p; wait \$pid_rc$p"; done
cmp /var/rc7271/recov.vol /var/rc7273/recov.vol || fail "column 0's replicas differ after the recovered catch-up"
cmp /var/rc7272/recov.vol /var/rc7274/recov.vol || fail "column 1's replicas differ after the recovered catch-up"
echo "ublk: R = 2, the daemon killed mid-catch-up: map --recover catches the replica up at the recorded rate ($BYTES bytes in $SECS s), data intact, replicas equal"
rm -rf /var/rc727*
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

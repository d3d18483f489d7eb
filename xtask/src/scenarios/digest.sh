# Data digests: three nodes that corrupt the payload of their first three
# writes on arrival and of their first three read replies on the way out;
# a volume mapped with --data-digest crc32c takes the copy data path and
# says so, fio's crc32c verify is clean, every corrupted write was refused
# by its node (and sent again), and the daemon counted every corruption.
dg_node() {
  netblk-mock-node --listen 127.0.0.1:$1 --store memory --corrupt-writes 3 --corrupt-replies 3 \
      --corrupt-part payload --metrics-addr 127.0.0.1:$(($1 + 100)) >/tmp/dg$1.out 2>/tmp/dg$1.log &
}
dg_node 7501; DGN1=$!
dg_node 7502; DGN2=$!
dg_node 7503; DGN3=$!
wait_listening /tmp/dg7501.out /tmp/dg7502.out /tmp/dg7503.out
netblk map --volume dg --size 256M --nodes 127.0.0.1:7501,127.0.0.1:7502,127.0.0.1:7503 --queues 2 \
    --data-digest crc32c --metrics-addr 127.0.0.1:9200 >/tmp/dg.out 2>/tmp/dg.log &
DG=$!
DEV=$(wait_dev /tmp/dg.out)
[ -b "$DEV" ] || fail "no device for the digest volume"
grep -q "data path: copy + crc32c data digests" /tmp/dg.log || fail "the log does not say digests and the copy data path"
netblk list >/tmp/dglist.out; grep -q "crc32c" /tmp/dglist.out || { cat /tmp/dglist.out; fail "list does not show the digests"; }
fio --name=digest --filename=$DEV --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bsrange=4k-256k --size=64M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output=/tmp/dgfio.log >/dev/null 2>&1 || { cat /tmp/dgfio.log; fail "fio verify with digests and corrupting nodes"; }
grep -q "err= 0" /tmp/dgfio.log || fail "fio reported errors with digests"
wget -q -O /tmp/dgmetrics.txt http://127.0.0.1:9200/metrics || fail "GET the daemon's /metrics"
CLIENT=$(grep -E '^netblk_digest_errors_total' /tmp/dgmetrics.txt | awk '{s += $2} END {print s + 0}')
REFUSED=0
for p in 7601 7602 7603; do
  wget -q -O /tmp/dgnode.txt http://127.0.0.1:$p/metrics || fail "GET node metrics"
  R=$(grep -E '^netblk_mock_digest_errors_total' /tmp/dgnode.txt | awk '{print $2}')
  W=$(grep -E '^netblk_mock_injected_faults_total\{fault="corrupt_write"\}' /tmp/dgnode.txt | awk '{print $2}')
  [ "$R" = 3 ] && [ "$W" = 3 ] || { grep -E 'digest|injected' /tmp/dgnode.txt; fail "node $p: $W corrupted writes, $R refused (want 3 and 3)"; }
  REFUSED=$((REFUSED + R))
done
[ "$CLIENT" -ge "$REFUSED" ] || fail "the daemon counted $CLIENT digest errors, the nodes refused $REFUSED writes"
netblk unmap "$DEV" >/dev/null 2>&1 || fail "unmap (digest)"
wait $DG
echo "ublk: --data-digest crc32c: copy data path reported; nodes corrupting 3 writes and 3 read replies each: fio crc32c verify clean, 9 corrupted writes refused and resent, $CLIENT digest errors counted by the daemon"
kill $DGN1 $DGN2 $DGN3 2>/dev/null
true

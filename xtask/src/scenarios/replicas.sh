# Replication (issue 22): a replica killed or stopped under fio verify costs
# no IO error and its column shows degraded; a second map of the volume is
# refused while its owner lives; a daemon killed -9 under writes is
# reconciled by `map --recover`, after which the replicas' files are equal
# byte for byte; a replica behind a veth link set down (a silent peer)
# costs no IO error either. Nodes with directory stores.
fio_raw() {
  fio --name=$1 --filename="$2" --ioengine=libaio --direct=1 --iodepth=16 \
      --rw=randwrite --bsrange=4k-256k --size=48M --rate=12m --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/$1.log >/dev/null 2>&1
}

# 1. R = 2: three columns over six nodes; column 1's second copy (7205) is
#    killed -9 mid-workload.
dir_nodes rep "" 7201 7202 7203 7204 7205 7206
R2=127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203,127.0.0.1:7204,127.0.0.1:7205,127.0.0.1:7206
netblk map --volume rep2 --size 256M --nodes $R2 --replicas 2 --replica-timeout 2 \
    --stripe-unit 64K --queues 2 >/tmp/rep2.out 2>/tmp/rep2.log &
MAP=$!
DEV=$(wait_dev /tmp/rep2.out)
[ -b "$DEV" ] || fail "no device for the replicated volume"
grep -q "attached the replicated volume" /tmp/rep2.log || fail "no attach event"
# A second map of the live volume is refused (on this host by its device
# record; from another host by the nodes: tests/tests/replication.rs).
netblk map --volume rep2 --size 256M --nodes $R2 --replicas 2 >/tmp/rep2b.out 2>/tmp/rep2b.log \
    && fail "a second map of a live replicated volume succeeded"
grep -q "already mapped as $DEV" /tmp/rep2b.log || { cat /tmp/rep2b.log; fail "the second map is not refused"; }
fio_raw r2kill "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the replica was killed"
kill -KILL $pid_rep7205
wait $FIO || fail "fio across a replica kill -9 (R = 2)"
grep -q "err= 0" /tmp/r2kill.log || fail "fio reported errors across a replica kill (R = 2)"
netblk status >/tmp/rep2status.out 2>&1 || fail "netblk status (R = 2)"
grep -q "column 1 DEGRADED in sync \[1\]" /tmp/rep2status.out || { cat /tmp/rep2status.out; fail "status does not show column 1 degraded"; }
grep -q "column 0 whole" /tmp/rep2status.out || { cat /tmp/rep2status.out; fail "status does not show column 0 whole"; }
grep -q "replica left the in-sync set" /tmp/rep2.log || fail "no event for the replica that left"
echo "ublk: R = 2, a replica killed -9 under fio verify: no error, column 1 degraded"
# The daemon is killed -9 under fio and recovered: it attaches again as the
# same owner (a new owner epoch), the replica that left stays out.
fio_raw r2rec "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the daemon was killed (R = 2)"
kill -KILL $MAP
sleep 0.5
netblk map --recover "$DEV" >/tmp/rep2rec.out 2>/tmp/rep2rec.log &
MAP=$!
wait $FIO || fail "fio across a daemon kill -9 and recovery (R = 2)"
grep -q "err= 0" /tmp/r2rec.log || fail "fio reported errors across the recovery (R = 2)"
grep -q "attached the replicated volume" /tmp/rep2rec.log || fail "the recovery did not attach"
netblk status >/tmp/rep2status2.out 2>&1 || fail "netblk status (R = 2, recovered)"
grep -q "column 1 DEGRADED in sync \[1\]" /tmp/rep2status2.out || { cat /tmp/rep2status2.out; fail "the recovered daemon does not keep the replica out"; }
echo "ublk: R = 2, daemon kill -9 under fio verify and map --recover: no error, the replica that left stays out"
netblk unmap "$DEV" >/tmp/unmaprep2.out 2>&1 || { cat /tmp/unmaprep2.out; fail "unmap (R = 2)"; }
wait $MAP || fail "the R = 2 daemon exited with an error"
# The stores live in the guest's memory: gone with the nodes.
for p in 7201 7202 7203 7204 7206; do eval "kill \$pid_rep$p; wait \$pid_rep$p"; done
rm -rf /var/rep720*

# 2. R = 3: one column over three nodes; one is stopped (SIGSTOP: its
#    connections stay open, nothing answers) mid-workload.
dir_nodes rep "" 7211 7212 7213
R3=127.0.0.1:7211,127.0.0.1:7212,127.0.0.1:7213
netblk map --volume rep3 --size 128M --nodes $R3 --replicas 3 --replica-timeout 2 \
    --queues 2 >/tmp/rep3.out 2>/tmp/rep3.log &
MAP=$!
DEV=$(wait_dev /tmp/rep3.out)
[ -b "$DEV" ] || fail "no device for the R = 3 volume"
fio_raw r3stop "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the replica was stopped"
kill -STOP $pid_rep7212
wait $FIO || fail "fio across a stopped replica (R = 3)"
grep -q "err= 0" /tmp/r3stop.log || fail "fio reported errors across a stopped replica (R = 3)"
netblk status >/tmp/rep3status.out 2>&1 || fail "netblk status (R = 3)"
grep -q "column 0 DEGRADED in sync \[0,2\]" /tmp/rep3status.out || { cat /tmp/rep3status.out; fail "status does not show the column degraded"; }
echo "ublk: R = 3, a replica stopped under fio verify: no error, column degraded"
kill -KILL $pid_rep7212
netblk unmap "$DEV" >/tmp/unmaprep3.out 2>&1 || { cat /tmp/unmaprep3.out; fail "unmap (R = 3)"; }
wait $MAP || fail "the R = 3 daemon exited with an error"
for p in 7211 7212 7213; do eval "kill \$pid_rep$p 2>/dev/null; wait \$pid_rep$p"; done
rm -rf /var/rep721*

# 3. Reconcile: R = 2 over two columns; the daemon is killed -9 with writes
#    in flight and recovered: the stop was unclean, so the attach reconciles
#    the regions in the members' activity logs before serving. After a
#    clean unmap the next map needs none, and the replicas of each column
#    are equal byte for byte.
dir_nodes rec "" 7221 7222 7223 7224
RC=127.0.0.1:7221,127.0.0.1:7222,127.0.0.1:7223,127.0.0.1:7224
netblk map --volume recon --size 128M --nodes $RC --replicas 2 --stripe-unit 64K \
    --queues 2 >/tmp/recon.out 2>/tmp/recon.log &
MAP=$!
DEV=$(wait_dev /tmp/recon.out)
[ -b "$DEV" ] || fail "no device for the reconcile volume"
fio_raw reckill "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the daemon was killed (reconcile)"
kill -KILL $MAP
sleep 0.5
netblk map --recover "$DEV" >/tmp/reconrec.out 2>/tmp/reconrec.log &
MAP=$!
wait $FIO || fail "fio across a daemon kill -9 and reconcile"
grep -q "err= 0" /tmp/reckill.log || fail "fio reported errors across the reconcile"
grep -q "reconciled the replicas" /tmp/reconrec.log || { cat /tmp/reconrec.log; fail "the recovery after an unclean stop did not reconcile"; }
netblk status >/tmp/reconstatus.out 2>&1 || fail "netblk status (reconcile)"
grep -q "reconciled after an unclean stop" /tmp/reconstatus.out || { cat /tmp/reconstatus.out; fail "status does not show the reconcile"; }
netblk unmap "$DEV" >/tmp/unmaprecon.out 2>&1 || { cat /tmp/unmaprecon.out; fail "unmap (reconcile)"; }
wait $MAP || fail "the recovered daemon exited with an error"
grep -q "stopped cleanly" /tmp/reconrec.log || { cat /tmp/reconrec.log; fail "the unmap did not mark the stop clean"; }
netblk map --volume recon --size 128M --nodes $RC --replicas 2 --stripe-unit 64K \
    >/tmp/recon2.out 2>/tmp/recon2.log &
MAP=$!
DEV=$(wait_dev /tmp/recon2.out)
[ -b "$DEV" ] || fail "no device for the remap after a clean stop"
grep -q "reconciling the replicas\\|reconciled the replicas" /tmp/recon2.log && { cat /tmp/recon2.log; fail "a map after a clean stop reconciled"; }
netblk unmap "$DEV" >/tmp/unmaprecon2.out 2>&1 || fail "unmap (after a clean stop)"
wait $MAP || fail "the second reconcile daemon exited with an error"
for p in 7221 7222 7223 7224; do eval "kill \$pid_rec$p; wait \$pid_rec$p"; done
# Address i is column i % 2, row i / 2.
cmp /var/rec7221/recon.vol /var/rec7223/recon.vol || fail "column 0's replicas differ after reconcile"
cmp /var/rec7222/recon.vol /var/rec7224/recon.vol || fail "column 1's replicas differ after reconcile"
echo "ublk: R = 2, daemon kill -9 under fio verify: map --recover reconciled, the replicas are equal byte for byte; a clean stop needs no reconcile"
rm -rf /var/rec722*

# 4. A silent peer: R = 2 over two nodes, one of them in a network namespace
#    of this scenario's own behind a veth link; the namespace side of the
#    link goes down mid-workload (nothing arrives, nothing is refused).
veth_netns repns nbv0 nbv1 10.99.0
mkdir -p /var/silent0 /var/silent1
netblk-mock-node --listen 127.0.0.1:7231 --store dir:/var/silent0 >/tmp/silent0.out 2>/tmp/silent0.log &
SN0=$!
ip-full netns exec repns netblk-mock-node --listen 10.99.0.2:7232 --store dir:/var/silent1 >/tmp/silent1.out 2>/tmp/silent1.log &
SN1=$!
wait_listening /tmp/silent0.out /tmp/silent1.out
netblk map --volume silent --size 64M --nodes 127.0.0.1:7231,10.99.0.2:7232 --replicas 2 \
    --replica-timeout 2 --queues 2 >/tmp/silent.out 2>/tmp/silent.log &
MAP=$!
DEV=$(wait_dev /tmp/silent.out)
[ -b "$DEV" ] || { cat /tmp/silent.log; fail "no device for the silent-peer volume"; }
fio_raw silentfio "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the link went down"
ip-full -n repns link set nbv1 down
wait $FIO || fail "fio across a silent peer (R = 2)"
grep -q "err= 0" /tmp/silentfio.log || fail "fio reported errors across a silent peer"
netblk status >/tmp/silentstatus.out 2>&1 || fail "netblk status (silent peer)"
grep -q "column 0 DEGRADED in sync \[0\]" /tmp/silentstatus.out || { cat /tmp/silentstatus.out; fail "status does not show the column degraded behind the silent peer"; }
echo "ublk: R = 2, a replica behind a veth link set down under fio verify: no error, column degraded"
ip-full -n repns link set nbv1 up
netblk unmap "$DEV" >/tmp/unmapsilent.out 2>&1 || { cat /tmp/unmapsilent.out; fail "unmap (silent peer)"; }
wait $MAP || fail "the silent-peer daemon exited with an error"
kill $SN0 $SN1; wait $SN0 $SN1
ip-full link del nbv0
ip-full netns del repns
rm -rf /var/silent0 /var/silent1
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

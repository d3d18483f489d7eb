# The CSI driver, as kubelet and the sidecars drive it: netblk-csi serving
# Controller and Node on a unix socket, netblk-csi-check calling it. The
# whole lifecycle for block, ext4 and xfs (every call twice, bad arguments
# refused with the spec's codes); then the plugin and its map daemons
# killed -9 (a DaemonSet pod replaced) while fio writes to a staged volume:
# the restarted plugin recovers the device and fio verifies clean.
CSI_SOCK=/run/csi/csi.sock
start_csi() {
  netblk-csi --socket $CSI_SOCK --controller --node --node-id vm >>/tmp/csi.out 2>>/tmp/csi.log &
  CSI=$!
  netblk-csi-check $CSI_SOCK wait-ready >/tmp/csiready.log 2>&1 || { cat /tmp/csiready.log; fail "the CSI plugin did not get ready"; }
}
netblk features | grep -q UPDATE_SIZE || export NETBLK_ONLINE_RESIZE=0
start_csi
netblk-csi-check $CSI_SOCK lifecycle $NODES >/tmp/csilife.out 2>&1 || { cat /tmp/csilife.out; fail "CSI lifecycle"; }
cat /tmp/csilife.out

K=/var/lib/kubelet/kill
ID=$(netblk-csi-check $CSI_SOCK create pvc-kill 320 $NODES) || fail "CSI create (kill)"
netblk-csi-check $CSI_SOCK stage "$ID" $K/staging ext4 || fail "CSI stage (kill)"
netblk-csi-check $CSI_SOCK publish "$ID" $K/staging $K/pod ext4 || fail "CSI publish (kill)"
fio --name=csikill --filename=$K/pod/fio --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bsrange=4k-64k --size=64M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --rate=10m --output=/tmp/csifio.log >/dev/null 2>&1 &
FIO=$!
# Writes take 6 s or more at that rate: the kill lands in the middle.
sleep 3
kill -0 $FIO 2>/dev/null || { cat /tmp/csifio.log; fail "fio ended before the plugin was killed"; }
# The pod replaced: the plugin and every map daemon it started die at once.
kill -9 $CSI $(pidof netblk); wait $CSI 2>/dev/null
sleep 1
start_csi
grep -q "recovering a device whose daemon is gone" /tmp/csi.log || fail "the restarted plugin did not recover the device"
wait $FIO || { cat /tmp/csifio.log; fail "fio across the plugin's kill -9"; }
grep -q "err= 0" /tmp/csifio.log || fail "fio reported errors across the plugin's kill -9"
netblk-csi-check $CSI_SOCK unpublish "$ID" $K/pod || fail "CSI unpublish (kill)"
netblk-csi-check $CSI_SOCK unstage "$ID" $K/staging || fail "CSI unstage (kill)"
netblk-csi-check $CSI_SOCK delete "$ID" || fail "CSI delete (kill)"
echo "csi: plugin and map daemons killed -9 during fio on a staged ext4 volume; the restarted plugin recovered the device, fio crc32c verify clean"
kill $CSI; wait $CSI 2>/dev/null
ls /dev/ublkb* 2>/dev/null && fail "the CSI scenario left a device behind"
true

# The CSI driver, as kubelet and the sidecars drive it: netblk-csi serving
# Controller and Node on a unix socket, netblk-csi-check calling it. The
# whole lifecycle for block, ext4 and xfs (every call twice, bad arguments
# refused with the spec's codes; formatted only when the controller made it
# for a filesystem and its nodes still hold the identities it was made
# with); then the plugin and its map daemons
# killed -9 (a DaemonSet pod replaced) while fio writes to a staged volume:
# the restarted plugin recovers the device and fio verifies clean; then the
# lifecycle over a pool (R = 2), and once more on TLS nodes, the plugin
# given the TLS files.
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
netblk-csi-check $CSI_SOCK formatting $NODES >/tmp/csiformat.out 2>&1 || { cat /tmp/csiformat.out; fail "CSI formatting"; }
cat /tmp/csiformat.out

K=/var/lib/kubelet/kill
CREATED=$(netblk-csi-check $CSI_SOCK create pvc-kill 320 $NODES) || fail "CSI create (kill)"
ID=${CREATED%% *}; CTX=${CREATED#* }
netblk-csi-check $CSI_SOCK stage "$ID" $K/staging ext4 "$CTX" || fail "CSI stage (kill)"
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
ls /dev/ublkb* 2>/dev/null && fail "the CSI scenario left a device behind"

# Over a pool: a StorageClass naming the pool `vm` (its file where the
# manifests mount the ConfigMap netblk-pools), R = 2 with replicas apart by
# zone: the whole lifecycle again; the map daemons read the placement from
# the nodes, and nothing is left on the pool after the deletes.
csi_pool_node() {
  netblk-mock-node --listen 127.0.0.1:$1 --store memory >/tmp/csipool$1.out 2>/tmp/csipool$1.log &
}
csi_pool_node 7821; CPN1=$!
csi_pool_node 7822; CPN2=$!
csi_pool_node 7823; CPN3=$!
csi_pool_node 7824; CPN4=$!
wait_listening /tmp/csipool7821.out /tmp/csipool7822.out /tmp/csipool7823.out /tmp/csipool7824.out
mkdir -p /etc/netblk/pools
for n in 1 2 3 4; do
  printf '[[node]]\naddress = "127.0.0.1:782%d"\nzone = "z%d"\n' $n $(((n + 1) / 2))
done > /etc/netblk/pools/vm.toml
netblk-csi-check $CSI_SOCK lifecycle pool=vm,replicas=2,spread=zone >/tmp/csipool.out 2>&1 \
    || { cat /tmp/csipool.out; fail "CSI lifecycle over a pool"; }
grep -q "placement read from the pool" /run/netblk/csi/pvc-life-*.log \
    || fail "the CSI-mapped volumes of a pool did not read their placement from the nodes"
netblk pool volumes /etc/netblk/pools/vm.toml >/tmp/csipoolvols.out 2>&1 || { cat /tmp/csipoolvols.out; fail "pool volumes"; }
[ -s /tmp/csipoolvols.out ] && { cat /tmp/csipoolvols.out; fail "volumes left on the pool after the CSI deletes"; }
kill $CPN1 $CPN2 $CPN3 $CPN4 2>/dev/null
echo "csi: a StorageClass over a pool (R = 2, zones apart): the whole lifecycle, placement read from the nodes, nothing left"

# Once more with TLS: nodes that take only clients with a certificate from
# the test CA; the plugin given the CA, certificate and key (what the
# manifests mount from a Secret) runs the whole lifecycle on them.
T=/etc/netblk/tls
csi_tls_node() {
  netblk-mock-node --listen 127.0.0.1:$1 --store memory --tls-cert $T/node.pem --tls-key $T/node.key \
      --tls-client-ca $T/ca.pem >/tmp/csitls$1.out 2>/tmp/csitls$1.log &
}
csi_tls_node 7811; CTN1=$!
csi_tls_node 7812; CTN2=$!
csi_tls_node 7813; CTN3=$!
wait_listening /tmp/csitls7811.out /tmp/csitls7812.out /tmp/csitls7813.out
CTNODES=127.0.0.1:7811,127.0.0.1:7812,127.0.0.1:7813
netblk-csi-check $CSI_SOCK create pvc-plain 64 $CTNODES >/tmp/csiplain.out 2>&1 && fail "a plaintext CSI create on TLS nodes succeeded"
kill $CSI; wait $CSI 2>/dev/null
netblk-csi --socket $CSI_SOCK --controller --node --node-id vm \
    --tls-ca $T/ca.pem --tls-cert $T/client.pem --tls-key $T/client.key >>/tmp/csi.out 2>>/tmp/csi.log &
CSI=$!
netblk-csi-check $CSI_SOCK wait-ready >/tmp/csiready.log 2>&1 || { cat /tmp/csiready.log; fail "the CSI plugin with TLS did not get ready"; }
netblk-csi-check $CSI_SOCK lifecycle $CTNODES >/tmp/csitls.out 2>&1 || { cat /tmp/csitls.out; fail "CSI lifecycle with TLS"; }
grep -q "kernel TLS\|userspace TLS" /run/netblk/csi/pvc-life-*.log || fail "the CSI-mapped volumes do not say they run on TLS"
echo "csi: TLS: the plugin with --tls-ca/--tls-cert/--tls-key: the whole lifecycle on TLS nodes; a plaintext plugin refused"
kill $CSI; wait $CSI 2>/dev/null
kill $CTN1 $CTN2 $CTN3 2>/dev/null
ls /dev/ublkb* 2>/dev/null && fail "the CSI scenario with TLS left a device behind"
true

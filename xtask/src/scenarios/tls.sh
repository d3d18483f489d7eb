# Mutual TLS: three nodes that take only clients with a certificate from
# the test CA (/etc/netblk/tls, made by xtask); a volume mapped with the
# client's certificate runs on the kernel's TLS (probed) and the copy data
# path and says so; fio's crc32c verify is clean; a plaintext map is refused
# with a clear error and leaves no device.
T=/etc/netblk/tls
tls_node() {
  netblk-mock-node --listen 127.0.0.1:$1 --store memory --tls-cert $T/node.pem --tls-key $T/node.key \
      --tls-client-ca $T/ca.pem >/tmp/tls$1.out 2>/tmp/tls$1.log &
}
tls_node 7801; TN1=$!
tls_node 7802; TN2=$!
tls_node 7803; TN3=$!
wait_listening /tmp/tls7801.out /tmp/tls7802.out /tmp/tls7803.out
TNODES=127.0.0.1:7801,127.0.0.1:7802,127.0.0.1:7803
netblk map --volume sec --size 256M --nodes $TNODES --queues 2 \
    --tls-ca $T/ca.pem --tls-cert $T/client.pem --tls-key $T/client.key >/tmp/sec.out 2>/tmp/sec.log &
SEC=$!
DEV=$(wait_dev /tmp/sec.out)
[ -b "$DEV" ] || { cat /tmp/sec.log; fail "no device for the TLS volume"; }
grep -q "data path: copy + kernel TLS" /tmp/sec.log || { cat /tmp/sec.log; fail "the TLS volume does not say it runs on the kernel's TLS"; }
netblk list >/tmp/seclist.out; grep -q "kernel TLS" /tmp/seclist.out || { cat /tmp/seclist.out; fail "list does not show the kernel's TLS"; }
fio --name=tls --filename=$DEV --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bsrange=4k-256k --size=64M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output=/tmp/secfio.log >/dev/null 2>&1 || { cat /tmp/secfio.log; fail "fio verify over TLS"; }
grep -q "err= 0" /tmp/secfio.log || fail "fio reported errors over TLS"
netblk map --volume plain --size 64M --nodes 127.0.0.1:7801 >/tmp/secplain.out 2>/tmp/secplain.log && fail "a plaintext map to a TLS node succeeded"
grep -q "a node with TLS closes a plaintext client" /tmp/secplain.log || { cat /tmp/secplain.log; fail "a plaintext map to a TLS node is not a clear error"; }
grep -q "TLS refused" /tmp/tls7801.log || fail "the node did not log the plaintext client it refused"
netblk unmap "$DEV" >/dev/null 2>&1 || fail "unmap (TLS)"
wait $SEC
kill $TN1 $TN2 $TN3 2>/dev/null
echo "ublk: mutual TLS to 3 nodes: data path copy + kernel TLS (list says so), fio crc32c verify clean; a plaintext map refused, naming TLS"

# Observability (issue 10): `netblk status --json` and `/metrics` of a
# mapped device under fio show the data path, each node's state and
# latency; a node that stops shows as down in both, then back; the log of a
# node restart has one "connection lost" and one "reconnected" event per
# connection, not one per retry.
# Nodes of its own, with directory stores, so one can restart in place.
dir_nodes onode "" 7401 7402 7403
ONODES=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
netblk map --volume seen --size 256M --nodes $ONODES --queues 2 --io-timeout 3 \
    --metrics-addr 127.0.0.1:9100 >/tmp/seen.out 2>/tmp/seen.log &
MAP=$!
DEV=$(wait_dev /tmp/seen.out)
[ -b "$DEV" ] || fail "no device for the observed volume"
grep -q "metrics at http://127.0.0.1:9100/metrics" /tmp/seen.log || fail "the daemon did not say where its metrics are"
# fio goes on after an error (--continue_on_error): under TCG a request can
# pass the 3 s timeout before node 1 is stopped, and the stop is seen only
# while requests keep coming.
fio --name=seen --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=16 --rw=randrw \
    --bsrange=4k-256k --size=64M --time_based --runtime=30 --continue_on_error=all \
    --output=/tmp/seenfio.log >/dev/null 2>&1 &
FIO=$!
sleep 3
netblk status --json >/tmp/status.json || fail "netblk status --json"
grep -q "\"data_path\":\"$EXPECT\"" /tmp/status.json || { cat /tmp/status.json; fail "status does not show the data path '$EXPECT'"; }
grep -q '"state":"live"' /tmp/status.json || { cat /tmp/status.json; fail "status does not show the device live"; }
[ "$(grep -o '"connected":true' /tmp/status.json | wc -l)" = 3 ] || { cat /tmp/status.json; fail "status does not show 3 nodes connected"; }
grep -q '"p50_ms":[0-9]' /tmp/status.json || { cat /tmp/status.json; fail "status has no node latency"; }
netblk status >/tmp/status.txt || fail "netblk status"
grep -q "node 1 127.0.0.1:7402 .*connected" /tmp/status.txt || { cat /tmp/status.txt; fail "status text does not show node 1 connected"; }
wget -q -O /tmp/metrics.txt http://127.0.0.1:9100/metrics || fail "GET /metrics"
grep -q "^netblk_data_path_info{.*path=\"$EXPECT\".*} 1" /tmp/metrics.txt || fail "metrics do not show the data path"
grep -qE '^netblk_request_duration_seconds_count\{.*op="write".*\} [1-9]' /tmp/metrics.txt || fail "no write latencies in the metrics"
grep -qE '^netblk_node_piece_duration_seconds_count\{.*node="127.0.0.1:7402".*\} [1-9]' /tmp/metrics.txt || fail "no piece latencies for node 1"
grep -qE '^netblk_node_connected\{.*node="127.0.0.1:7402".*\} 1' /tmp/metrics.txt || fail "metrics do not show node 1 connected"
echo "ublk: status --json and /metrics under fio: data path $EXPECT, 3 nodes connected, latency histograms filled"
# Small write payloads (below 16 KiB) are copied and gathered with the
# heads on every data path (on zero-copy devices through user copy), large
# ones go zero-copy: from netblk's own buffers on the copy path; on
# zero-copy devices only to nodes that are not on this host (these are on
# loopback: the request's pages go by copy; see fs.sh, XFS).
grep -qE '^netblk_payload_sent_bytes_total\{.*mode="copy".*\} [1-9]' /tmp/metrics.txt || { grep payload_sent /tmp/metrics.txt; fail "no small write payload was copied"; }
ZC_SENT=$(awk '/^netblk_payload_sent_bytes_total\{.*mode="zerocopy"/ {s += $2} END {printf "%d", s}' /tmp/metrics.txt)
case $EXPECT in
  copy)
    [ "$ZC_SENT" -gt 0 ] || { grep payload_sent /tmp/metrics.txt; fail "no large write payload went zero-copy"; }
    echo "ublk: small write payloads copied and gathered, large ones zero-copy ($EXPECT)" ;;
  *)
    [ "$ZC_SENT" = 0 ] || { grep payload_sent /tmp/metrics.txt; fail "request pages went zero-copy to a node on this host"; }
    echo "ublk: every write payload to nodes on this host copied, none zero-copy ($EXPECT)" ;;
esac
sed 's/^/ublk: status: /' /tmp/status.txt
grep -E '^netblk_(node_connected|node_piece_duration_seconds_count|requests_total|data_path_info)' /tmp/metrics.txt | sed 's/^/ublk: metrics: /'

# Node 1 stops: once a request times out on it (--io-timeout 3) its
# connections are torn down, and both views say so.
kill -STOP $pid_onode7402
DOWN=
for i in $(seq 60); do
  sleep 0.5
  netblk status --json >/tmp/status2.json 2>/dev/null
  wget -q -O /tmp/metrics2.txt http://127.0.0.1:9100/metrics 2>/dev/null
  if grep -q '"address":"127.0.0.1:7402","connected":false' /tmp/status2.json \
     && grep -qE '^netblk_node_connected\{.*node="127.0.0.1:7402".*\} 0' /tmp/metrics2.txt; then
    DOWN=1; break
  fi
done
[ -n "$DOWN" ] || { cat /tmp/status2.json; grep node_connected /tmp/metrics2.txt; kill -CONT $pid_onode7402; fail "a stopped node does not show as down"; }
kill -CONT $pid_onode7402
UP=
for i in $(seq 60); do
  sleep 0.5
  wget -q -O /tmp/metrics3.txt http://127.0.0.1:9100/metrics 2>/dev/null
  grep -qE '^netblk_node_connected\{.*node="127.0.0.1:7402".*\} 1' /tmp/metrics3.txt && UP=1 && break
done
[ -n "$UP" ] || fail "node 1 does not show as back after SIGCONT"
echo "ublk: a stopped node shows as down in status and /metrics, and back after SIGCONT"
wait $FIO
# Read replies: copied from the connection buffer on the copy path; on
# zero-copy devices big ones straight into the pages, small ones copied in
# while no big read is in flight (4 KiB reads alone, after the mixed run, make sure of some).
fio --name=small --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=16 --rw=randread \
    --bs=4k --size=16M --runtime=2 --time_based >/dev/null 2>&1 || fail "fio 4 KiB reads"
wget -q -O /tmp/metrics.txt http://127.0.0.1:9100/metrics || fail "GET /metrics"
grep -qE '^netblk_payload_received_bytes_total\{.*mode="copy".*\} [1-9]' /tmp/metrics.txt || { grep payload_received /tmp/metrics.txt; fail "no read payload was copied in"; }
case $EXPECT in
  *"zero copy") grep -qE '^netblk_payload_received_bytes_total\{.*mode="direct".*\} [1-9]' /tmp/metrics.txt || { grep payload_received /tmp/metrics.txt; fail "no big read payload went straight into the pages"; } ;;
esac
grep -q "no longer copies small payloads" /tmp/seen.log && fail "user copy of small payloads was refused"
echo "ublk: read payloads copied in and (zero copy) received into the pages"

# Node 2 (7403) restarts while fio runs: one lost and one reconnected event per
# connection (2 queues), however many reconnect attempts failed between.
fio --name=seen2 --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite \
    --bs=4k --size=64M --time_based --runtime=8 --output=/tmp/seenfio2.log >/dev/null 2>&1 &
FIO=$!
sleep 1
kill -KILL $pid_onode7403
sleep 4
restart_dir_node onode "" 7403 &
wait $FIO
# Both queues reconnect in the background, IO or not (backoff up to 2 s).
for i in $(seq 100); do
  [ "$(grep "reconnected" /tmp/seen.log | grep -c "node=2")" -ge 2 ] && break
  sleep 0.2
done
LOST=$(grep "connection lost" /tmp/seen.log | grep -c "node=2")
BACK=$(grep "reconnected" /tmp/seen.log | grep -c "node=2")
[ "$LOST" = 2 ] || { grep "node=2" /tmp/seen.log; fail "$LOST 'connection lost' events for node 2, not one per connection (2)"; }
[ "$BACK" = 2 ] || { grep "node=2" /tmp/seen.log; fail "$BACK 'reconnected' events for node 2, not one per connection (2)"; }
[ "$(grep -c "node=2" /tmp/seen.log)" -le 8 ] || { grep "node=2" /tmp/seen.log; fail "node 2's outage flooded the log"; }
echo "ublk: a node restart logs one lost and one reconnected event per connection"
grep "node=2" /tmp/seen.log | sed 's/^/ublk: log: /'
kill -TERM $MAP; wait $MAP || fail "the observed map exited with an error"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

# A node that is not on this host (in a network namespace of this
# scenario's own, behind a veth link): zero-copy devices send large write
# payloads to it straight from the request's pages.
case $EXPECT in *"zero copy")
  veth_netns zcns zcv0 zcv1 10.98.0
  # Its loopback down: the node must still stop on SIGTERM, reaching
  # nothing of its own (mock_node.rs has the same test).
  ip-full -n zcns link set lo down
  ip-full netns exec zcns netblk-mock-node --listen 10.98.0.2:7411 --store memory >/tmp/zcnode.out 2>/tmp/zcnode.log &
  ZN=$!
  wait_listening /tmp/zcnode.out
  netblk map --volume far --size 64M --nodes 10.98.0.2:7411 --metrics-addr 127.0.0.1:9101 >/tmp/far.out 2>/tmp/far.log &
  MAP=$!
  DEV=$(wait_dev /tmp/far.out)
  [ -b "$DEV" ] || { cat /tmp/far.log; fail "no device over the veth link"; }
  dd if=/dev/urandom of=/tmp/far.data bs=1M count=8 2>/dev/null
  dd if=/tmp/far.data of="$DEV" bs=1M oflag=direct 2>/dev/null || fail "1 MiB writes over the veth link"
  dd if="$DEV" of=/tmp/far.back bs=1M count=8 iflag=direct 2>/dev/null || fail "reads over the veth link"
  cmp /tmp/far.data /tmp/far.back || fail "data over the veth link differs"
  wget -q -O /tmp/farmetrics.txt http://127.0.0.1:9101/metrics || fail "GET /metrics (veth)"
  ZC_FAR=$(awk '/^netblk_payload_sent_bytes_total\{.*mode="zerocopy"/ {s += $2} END {printf "%d", s}' /tmp/farmetrics.txt)
  [ "$ZC_FAR" -ge $((8 << 20)) ] || { grep payload_sent /tmp/farmetrics.txt; fail "large writes to a node off this host did not go zero-copy"; }
  netblk unmap "$DEV" >/tmp/farunmap.out 2>&1 || { cat /tmp/farunmap.out; fail "unmap (veth)"; }
  wait $MAP || fail "the veth map exited with an error"
  kill $ZN; wait $ZN
  ip-full link del zcv0
  ip-full netns del zcns
  rm -f /tmp/far.data /tmp/far.back
  echo "ublk: 1 MiB writes to a node behind a veth link sent zero-copy ($ZC_FAR bytes), read back equal ($EXPECT)"
  ls /dev/ublkb* 2>/dev/null && fail "a device was left behind" ;;
esac

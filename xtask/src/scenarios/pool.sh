# Placement over a pool (issue 26): a volume created from a pool of six
# nodes in three zones (2 columns x R = 2, replicas apart by zone) is mapped
# by name with `map --pool`, which reads its placement from the nodes'
# records; fio verify runs while one zone's nodes are killed -9: no IO
# error. Then the pool grows by a heavy node the hash would now prefer,
# and the volume, mapped again from the pool with that zone still down,
# is where its records put it and reads back what was written.
fio_pool() {
  fio --name=$1 --filename="$2" --ioengine=libaio --direct=1 --iodepth=16 \
      --rw=randwrite --bsrange=4k-256k --size=64M --offset=0 --rate=12m --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/$1.log >/dev/null 2>&1
}

dir_nodes pool "" 7301 7302 7303 7304 7305 7306
POOL=/tmp/pool.toml
: > $POOL
i=0
for z in a a b b c c; do
  i=$((i + 1))
  printf '[[node]]\naddress = "127.0.0.1:730%d"\nzone = "%s"\n\n' $i $z >> $POOL
done
netblk pool check $POOL >/tmp/poolcheck.out 2>&1 || { cat /tmp/poolcheck.out; fail "pool check"; }
netblk create --pool $POOL --volume pooled --size 256M --columns 2 --replicas 2 \
    --spread zone --stripe-unit 64K >/tmp/poolcreate.out 2>&1 \
    || { cat /tmp/poolcreate.out; fail "netblk create --pool"; }
MEMBERS=$(sed -n 's/^nodes: //p' /tmp/poolcreate.out)
[ "$(echo "$MEMBERS" | tr , '\n' | wc -l)" -eq 4 ] || { cat /tmp/poolcreate.out; fail "create placed no 4 members"; }
# zone_of ADDR: the zone index (0 to 2) of a pool node 127.0.0.1:730N.
zone_of() { n=${1##*:730}; echo $(((n - 1) / 2)); }
# Replicas of a column (members i and i + 2) in distinct zones.
m() { echo "$MEMBERS" | cut -d, -f$1; }
[ "$(zone_of $(m 1))" != "$(zone_of $(m 3))" ] && [ "$(zone_of $(m 2))" != "$(zone_of $(m 4))" ] \
    || fail "replicas of a column share a zone: $MEMBERS"
netblk map --pool $POOL --volume pooled --queues 2 --replica-timeout 2 \
    >/tmp/pooled.out 2>/tmp/pooled.log &
MAP=$!
DEV=$(wait_dev /tmp/pooled.out)
[ -b "$DEV" ] || fail "no device for the volume mapped from its pool"
grep -q "placement read from the pool.*nodes=$MEMBERS" /tmp/pooled.log \
    || fail "map --pool did not read the created placement ($MEMBERS)"
# A known pattern past fio's range, read back after the second map.
dd if=/dev/urandom of=/tmp/poolpat bs=1M count=8 2>/dev/null
dd if=/tmp/poolpat of="$DEV" bs=1M seek=128 oflag=direct conv=fsync 2>/dev/null \
    || fail "writing the pattern"
# The first member's zone goes down, both its nodes, under fio verify.
Z=$(zone_of $(m 1))
A=$((7301 + 2 * Z)); B=$((7302 + 2 * Z))
fio_pool poolzone "$DEV" &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the zone was killed"
eval "kill -KILL \$pid_pool$A \$pid_pool$B"
wait $FIO || fail "fio across the loss of zone $Z"
grep -q "err= 0" /tmp/poolzone.log || fail "fio reported errors across the loss of a zone"
netblk status >/tmp/poolstatus.out 2>&1 || fail "netblk status (pool)"
grep -q "DEGRADED" /tmp/poolstatus.out || { cat /tmp/poolstatus.out; fail "no column degraded after a zone died"; }
echo "ublk: a volume placed over a pool (2 x 2, zones apart), one zone killed -9 under fio verify: no error"
netblk unmap "$DEV" >/tmp/unmappool.out 2>&1 || { cat /tmp/unmappool.out; fail "unmap (pool)"; }
wait $MAP || fail "the pool volume's daemon exited with an error"

# The pool grows: a heavy node in a fourth zone that the hash now puts in
# the volume's place. The volume stays on its members.
dir_nodes pool "" 7307
printf '[[node]]\naddress = "127.0.0.1:7307"\nzone = "d"\nweight = 1000\n' >> $POOL
netblk pool place $POOL --volume pooled --columns 2 --replicas 2 --spread zone >/tmp/poolplace.out 2>&1
grep -q 127.0.0.1:7307 /tmp/poolplace.out || { cat /tmp/poolplace.out; fail "the heavy node would take no place"; }
netblk map --pool $POOL --volume pooled --queues 2 --replica-timeout 2 \
    >/tmp/pooled2.out 2>/tmp/pooled2.log &
MAP=$!
DEV=$(wait_dev /tmp/pooled2.out)
[ -b "$DEV" ] || { cat /tmp/pooled2.log; fail "no device for the second map from the pool (a zone down)"; }
grep -q "placement read from the pool.*nodes=$MEMBERS" /tmp/pooled2.log \
    || fail "the second map did not find the volume on its members ($MEMBERS)"
dd if="$DEV" bs=1M skip=128 count=8 iflag=direct 2>/dev/null | cmp - /tmp/poolpat \
    || fail "the pattern did not read back after the pool changed"
echo "ublk: the pool grew by a node the hash prefers: map --pool found the volume where its records put it, data intact"
netblk unmap "$DEV" >/tmp/unmappool2.out 2>&1 || { cat /tmp/unmappool2.out; fail "unmap (pool, again)"; }
wait $MAP || fail "the second pool daemon exited with an error"
for p in 7301 7302 7303 7304 7305 7306 7307; do
  [ "$p" = "$A" ] || [ "$p" = "$B" ] || eval "kill \$pid_pool$p; wait \$pid_pool$p"
done
rm -rf /var/pool730*

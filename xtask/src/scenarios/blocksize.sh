# A 4 KiB logical block size.
netblk map --volume vm4k --size 64M --nodes $NODES --block-size 4096 >/tmp/map4k.out 2>/tmp/map4k.log &
MAP4K=$!
DEV4K=$(wait_dev /tmp/map4k.out)
[ -b "$DEV4K" ] || fail "no device for --block-size 4096"
[ "$(blockdev --getss $DEV4K)" = 4096 ] || fail "logical block size is not 4096"
dd if=/dev/urandom of=/tmp/d4k bs=1M count=4 2>/dev/null
dd if=/tmp/d4k of=$DEV4K bs=1M conv=fsync 2>/dev/null || fail "write with 4 KiB blocks"
echo 3 > /proc/sys/vm/drop_caches
dd if=$DEV4K of=/tmp/b4k bs=1M count=4 2>/dev/null
cmp /tmp/d4k /tmp/b4k || fail "4 KiB-block device read back differs"
kill -TERM $MAP4K; wait $MAP4K || fail "4 KiB-block map exited with an error"
echo "ublk: --block-size 4096 device: 4 MiB written and read back"

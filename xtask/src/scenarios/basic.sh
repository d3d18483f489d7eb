# The first device is /dev/ublkb0: the others were all removed.
netblk map --volume vm --size 1G --nodes $NODES --stripe-unit 64K --queues 2 >/tmp/map.out 2>/tmp/map.log &
MAP=$!
# The path is printed once the device is usable.
wait_dev /tmp/map.out >/dev/null
grep -q /dev/ublkb0 /tmp/map.out || fail "map did not print the device path"
[ -b /dev/ublkb0 ] || fail "no /dev/ublkb0 after map"
grep -qE "data path: $EXPECT( |$)" /tmp/map.log || fail "expected the data path '$EXPECT'"
echo "ublk: data path: $EXPECT (as expected for this kernel)"

# Data written through the device reads back the same, past the page cache.
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
dd if=/tmp/data of=/dev/ublkb0 bs=1M seek=3 conv=fsync 2>/dev/null || fail "write to the device"
blockdev --flushbufs /dev/ublkb0
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/ublkb0 of=/tmp/back bs=1M skip=3 count=16 2>/dev/null || fail "read from the device"
cmp /tmp/data /tmp/back || fail "data read back differs"
echo "ublk: 16 MiB written and read back through /dev/ublkb0"

# fio: random writes of mixed sizes at depth 32, then every block verified.
fio --name=verify --filename=/dev/ublkb0 --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randwrite --bsrange=4k-1m --size=64M --offset=128M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output=/tmp/fio.log >/dev/null 2>&1 || fail "fio verify"
grep -q "err= 0" /tmp/fio.log || fail "fio reported errors"
echo "ublk: fio randwrite 4k-1m depth 32 with crc32c verify: ok"
# 4 KiB only: on zero-copy devices the replies then come in bulk and their
# payloads are copied into the pages (user copy); verified all the same.
fio --name=small --filename=/dev/ublkb0 --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randwrite --bs=4k --size=16M --offset=256M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --output=/tmp/fio-small.log >/dev/null 2>&1 || fail "fio verify, 4 KiB"
grep -q "err= 0" /tmp/fio-small.log || fail "fio reported errors (4 KiB)"
echo "ublk: fio randwrite 4k depth 32 with crc32c verify: ok"
# Zero copy stages only small payloads in the tag buffers (2 queues of 64
# MiB): they must stay mostly unbacked, not fill with huge pages.
case $EXPECT in *"zero copy")
  RSS=$(awk '/^VmRSS/ {print $2}' /proc/$MAP/status)
  [ "$RSS" -lt 65536 ] || fail "the zero-copy daemon holds $RSS KiB after 4 KiB IO"
  echo "ublk: zero-copy daemon resident after 4 KiB IO: $RSS KiB" ;;
esac

# list shows the device; unmap removes it, once.
netblk list >/tmp/list.out || fail "netblk list"
grep -q "/dev/ublkb0 *vm *$EXPECT *live" /tmp/list.out || { cat /tmp/list.out; fail "list does not show the device live"; }
netblk unmap /dev/ublkb0 >/tmp/unmap.out 2>&1 || { cat /tmp/unmap.out; fail "unmap"; }
wait $MAP || fail "map exited with an error"
[ -e /dev/ublkb0 ] && fail "/dev/ublkb0 still there after unmap"
netblk unmap /dev/ublkb0 >/tmp/unmap2.out 2>&1 && fail "a second unmap succeeded"
grep -q "no netblk device 0" /tmp/unmap2.out || { cat /tmp/unmap2.out; fail "a second unmap is not a clear error"; }
echo "ublk: list shows the device; unmap removes it; a second unmap is a clear error"

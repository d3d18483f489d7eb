# ext4: files survive unmap and a fresh map of the same volume.
netblk map --volume fs --size 1G --nodes $NODES --stripe-unit 64K --queues 2 >/tmp/fsmap.out 2>/tmp/fsmap.log &
MAP=$!
DEV=$(wait_dev /tmp/fsmap.out)
[ -b "$DEV" ] || fail "no device for the ext4 volume"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p /mnt && mount -t ext4 "$DEV" /mnt || fail "mount"
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/file$i bs=1M count=$((i * 5)) 2>/dev/null; done
sync
(cd /mnt && md5sum file1 file2 file3) > /tmp/sums
umount /mnt || fail "umount"
netblk unmap "$DEV" >/tmp/fsunmap.out 2>&1 || { cat /tmp/fsunmap.out; fail "unmap of the ext4 volume"; }
wait $MAP || fail "map exited with an error"
[ -e "$DEV" ] && fail "$DEV still there after unmap"

netblk map --volume fs --size 1G --nodes $NODES --stripe-unit 64K --queues 2 >/tmp/map2.out 2>/tmp/map2.log &
MAP=$!
DEV=$(wait_dev /tmp/map2.out)
[ -b "$DEV" ] || fail "no device after the second map"
mount -t ext4 "$DEV" /mnt || fail "mount after remap"
(cd /mnt && md5sum -c /tmp/sums) >/dev/null || fail "checksums after remap"
umount /mnt || fail "umount after remap"
e2fsck -fn "$DEV" >/tmp/fsck.log 2>&1 || fail "e2fsck -fn"
echo "ublk: ext4 files intact after unmap and remap; e2fsck -fn clean"

# Discard frees and reads back zeroes.
blkdiscard "$DEV" || fail "blkdiscard"
blockdev --flushbufs "$DEV"
echo 3 > /proc/sys/vm/drop_caches
dd if="$DEV" of=/tmp/after bs=1M count=16 2>/dev/null
dd if=/dev/zero of=/tmp/zero bs=1M count=16 2>/dev/null
cmp /tmp/after /tmp/zero || fail "discarded blocks do not read as zeroes"
echo "ublk: blkdiscard reads back zeroes"
kill -TERM $MAP
wait $MAP || fail "second map exited with an error"
echo "ublk: device removed on SIGTERM"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

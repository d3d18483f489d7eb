# Online resize: with ext4 mounted, `netblk resize` grows the volume on
# every node and the device, resize2fs grows the filesystem online, the new
# space takes data, e2fsck is clean; a shrink is refused without --force;
# the record follows (a recovered daemon serves the new size). On a kernel
# without UBLK_F_UPDATE_SIZE: a clear error, and nothing changed.
MIB=1048576
netblk map --volume rs --size 256M --nodes $NODES --queues 2 >/tmp/rs.out 2>/tmp/rs.log &
RS=$!
DEV=$(wait_dev /tmp/rs.out)
[ -b "$DEV" ] || fail "no device for the resize volume"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4 (resize)"
mkdir -p /mnt && mount -t ext4 "$DEV" /mnt || fail "mount (resize)"
dd if=/dev/urandom of=/mnt/old bs=1M count=16 2>/dev/null; sync
(cd /mnt && md5sum old) > /tmp/rssum
REC="${NETBLK_STATE_DIR:-/run/netblk}/ublk${DEV#/dev/ublkb}"
if netblk features | grep -q UPDATE_SIZE; then
  netblk resize "$DEV" 256M --force >/tmp/rssame.out 2>&1 || fail "a resize to the same size failed"
  netblk resize "$DEV" 512M >/tmp/rsgrow.out 2>&1 || { cat /tmp/rsgrow.out; fail "netblk resize 512M"; }
  grep -q "resized $DEV from $((256 * MIB)) to $((512 * MIB)) bytes" /tmp/rsgrow.out || { cat /tmp/rsgrow.out; fail "resize did not say what it did"; }
  [ "$(blockdev --getsize64 "$DEV")" = $((512 * MIB)) ] || fail "the device did not grow"
  grep -q "^size $((512 * MIB))$" "$REC" || { cat "$REC"; fail "the record did not follow the resize"; }
  resize2fs "$DEV" >/tmp/rs2fs.log 2>&1 || fail "resize2fs online"
  KB=$(df -k /mnt | awk 'NR==2 {print $2}')
  [ "$KB" -gt 400000 ] || fail "the filesystem did not grow ($KB KiB)"
  # More than the old 256 MiB filesystem could hold.
  dd if=/dev/urandom of=/mnt/new bs=1M count=300 2>/tmp/rsdd.log && sync || fail "writing into the new space"
  (cd /mnt && md5sum -c /tmp/rssum) >/dev/null || fail "old data after the resize"
  netblk resize "$DEV" 384M >/tmp/rsshrink.out 2>&1 && fail "a shrink without --force succeeded"
  grep -q "refused without --force" /tmp/rsshrink.out || fail "a refused shrink does not say why"
  [ "$(blockdev --getsize64 "$DEV")" = $((512 * MIB)) ] || fail "a refused shrink changed the size"
  # The daemon killed: the recovered one presents the new size to the nodes.
  kill -9 $RS; wait $RS 2>/dev/null
  netblk map --recover "$DEV" >/tmp/rs2.out 2>/tmp/rs2.log &
  RS=$!
  [ "$(wait_dev /tmp/rs2.out)" = "$DEV" ] || { cat /tmp/rs2.log; fail "recovery after the resize"; }
  (cd /mnt && md5sum new > /tmp/rsnew && md5sum -c /tmp/rssum) >/dev/null || fail "data after recovering the resized device"
  echo "ublk: netblk resize 256M -> 512M with ext4 mounted: device and record grown, resize2fs online, 300 MiB written into it, old data intact; a shrink without --force refused; recovery serves the new size"
else
  netblk resize "$DEV" 512M >/tmp/rsno.out 2>&1 && fail "a resize succeeded on a kernel without UPDATE_SIZE"
  grep -q "cannot resize a device (no UBLK_F_UPDATE_SIZE" /tmp/rsno.out || { cat /tmp/rsno.out; fail "a kernel that cannot resize is not a clear error"; }
  [ "$(blockdev --getsize64 "$DEV")" = $((256 * MIB)) ] || fail "a refused resize changed the device"
  grep -q "^size $((256 * MIB))$" "$REC" || fail "a refused resize changed the record"
  echo "ublk: netblk resize on a kernel without UPDATE_SIZE: a clear error, the device and its record unchanged"
fi
umount /mnt || fail "umount (resize)"
e2fsck -fn "$DEV" >/tmp/rsfsck.log 2>&1 || fail "e2fsck -fn after the resize"
if netblk features | grep -q UPDATE_SIZE; then
  # Forced, a shrink goes through: the kernel first, then the nodes.
  netblk resize "$DEV" 384M --force >/tmp/rsforce.out 2>&1 || { cat /tmp/rsforce.out; fail "a forced shrink"; }
  [ "$(blockdev --getsize64 "$DEV")" = $((384 * MIB)) ] || fail "a forced shrink did not shrink the device"
  grep -q "^size $((384 * MIB))$" "$REC" || fail "the record did not follow the shrink"
  dd if="$DEV" of=/dev/null bs=1M count=16 skip=360 iflag=direct 2>/dev/null || fail "reading the shrunk device's end"
  echo "ublk: a forced shrink to 384M: device, record and nodes follow"
fi
netblk unmap "$DEV" >/tmp/rsunmap.out 2>&1 || { cat /tmp/rsunmap.out; fail "unmap (resize)"; }
wait $RS
[ -e "$DEV" ] && fail "$DEV still there after unmap (resize)"
# The nodes kept the size the device had: a new map with it is accepted.
SIZE=256M; netblk features | grep -q UPDATE_SIZE && SIZE=384M
netblk map --volume rs --size $SIZE --nodes $NODES >/tmp/rs3.out 2>/tmp/rs3.log &
RS=$!
DEV=$(wait_dev /tmp/rs3.out)
[ -b "$DEV" ] || { cat /tmp/rs3.log; fail "the nodes do not take the volume at $SIZE"; }
netblk unmap "$DEV" >/dev/null 2>&1 || fail "unmap (resize, again)"
wait $RS
echo "ublk: the nodes hold the volume at $SIZE after the resize checks"

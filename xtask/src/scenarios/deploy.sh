# Host deployment, as the systemd unit runs it: a volume file mapped with
# `map --config`; a daemon that dies is replaced by the next `map --config`
# of the volume (the same device, data intact: what Restart=on-failure
# does); SIGTERM while the device is mounted (a `systemctl restart`) or
# held open by a process (no O_EXCL) leaves it for that next map, and unmap
# refuses it; the udev helper names it.
VOLS=/tmp/volumes
mkdir -p $VOLS
NODE_LIST=$(echo "$NODES" | sed 's/[^,]*/"&"/g')
printf 'nodes = [%s]\nsize = "256M"\nqueues = 2\nio_timeout = 20\n' "$NODE_LIST" > $VOLS/dep.toml
# Bad files are refused before anything starts, naming the key.
printf 'nodes = [%s]\nsize = "256M"\ndepht = 8\n' "$NODE_LIST" > $VOLS/bad.toml
netblk map --config $VOLS/bad.toml >/tmp/depbad.out 2>/tmp/depbad.log; RC=$?
[ $RC -eq 2 ] || fail "a volume file with an unknown key: exit $RC, not 2"
grep -q 'unknown key `depht`' /tmp/depbad.log || fail "an unknown key in a volume file is not named"
printf 'nodes = [%s]\nsize = "lots"\n' "$NODE_LIST" > $VOLS/bad2.toml
netblk map --config $VOLS/bad2.toml >/tmp/depbad2.out 2>/tmp/depbad2.log && fail "a volume file with a bad size was mapped"
grep -q 'key `size`' /tmp/depbad2.log || fail "a bad value in a volume file does not name its key"
ls /dev/ublkb* 2>/dev/null && fail "a refused volume file made a device"
echo "ublk: volume files with an unknown key or a bad value are refused, naming the key"

netblk map --config $VOLS/dep.toml >/tmp/dep1.out 2>/tmp/dep1.log &
D1=$!
DEV=$(wait_dev /tmp/dep1.out)
[ -b "$DEV" ] || fail "no device from map --config"
[ "$(netblk udev-name ${DEV#/dev/})" = dep ] || fail "udev-name does not name $DEV after its volume"
netblk list >/tmp/deplist.out; grep -q "$DEV *dep " /tmp/deplist.out || fail "list does not show volume dep"
netblk map --config $VOLS/dep.toml >/tmp/deptwice.out 2>/tmp/deptwice.log && fail "a second map of a mapped volume succeeded"
grep -q "already mapped as $DEV" /tmp/deptwice.log || fail "a second map of a mapped volume is not a clear error"
echo "ublk: map --config maps the volume named after its file; udev-name gives that name; a second map is refused"

FIO="--name=dep --filename=$DEV --ioengine=libaio --direct=1 --iodepth=16 --rw=write --bs=64k --size=64M --verify=crc32c"
fio $FIO --do_verify=0 --output=/tmp/depfio1.log >/dev/null 2>&1 || fail "fio write before the crash"
kill -9 $D1; wait $D1 2>/dev/null
netblk map --config $VOLS/dep.toml >/tmp/dep2.out 2>/tmp/dep2.log &
D2=$!
DEV2=$(wait_dev /tmp/dep2.out)
[ "$DEV2" = "$DEV" ] || fail "map --config after a crash gave '$DEV2', not the device $DEV"
grep -q "waits for a daemon: recovering it" /tmp/dep2.log || fail "map --config did not say it recovers the device"
fio $FIO --verify_only --output=/tmp/depfio2.log >/dev/null 2>&1 || fail "fio verify after the daemon was killed"
grep -q "err= 0" /tmp/depfio2.log || fail "fio verify reported errors after recovery"
echo "ublk: daemon killed, map --config again: the same device, fio crc32c verify clean"

mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4"
mkdir -p /mnt && mount -t ext4 "$DEV" /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/before bs=1M count=8 2>/dev/null; sync
# What `systemctl stop` or `restart` sends: SIGTERM. Mounted, the device stays.
kill -TERM $D2; wait $D2; RC=$?
[ $RC -eq 0 ] || fail "SIGTERM of a daemon whose device is mounted: exit $RC"
grep -q "is in use" /tmp/dep2.log || fail "the daemon did not say why it left the device"
[ -b "$DEV" ] || fail "SIGTERM took a mounted device away"
netblk unmap "$DEV" >/tmp/depunmap.out 2>&1 && fail "unmap of a mounted device succeeded"
grep -q "in use" /tmp/depunmap.out || fail "unmap of a mounted device is not a clear error"
netblk map --config $VOLS/dep.toml >/tmp/dep3.out 2>/tmp/dep3.log &
D3=$!
[ "$(wait_dev /tmp/dep3.out)" = "$DEV" ] || fail "map --config after a stop of a mounted device did not recover it"
(cd /mnt && md5sum before > /tmp/depsum && dd if=/dev/urandom of=after bs=1M count=8 2>/dev/null && sync) || fail "the filesystem after the restart"
umount /mnt || fail "umount"
e2fsck -fn "$DEV" >/tmp/depfsck.log 2>&1 || fail "e2fsck -fn after the restart"
echo "ublk: SIGTERM with the device mounted leaves it (unmap refuses it), map --config recovers it, ext4 clean"
# Open without O_EXCL (a database on the raw device): in use as well.
sleep 600 <"$DEV" &
HOLD=$!
sleep 0.2
kill -TERM $D3; wait $D3; RC=$?
[ $RC -eq 0 ] || fail "SIGTERM of a daemon whose device is open: exit $RC"
grep -q "is in use (open by pid $HOLD (sleep))" /tmp/dep3.log || fail "the daemon did not name the process holding the device open"
[ -b "$DEV" ] || fail "SIGTERM took a device a process holds open away"
netblk unmap "$DEV" >/tmp/depunmap2.out 2>&1 && fail "unmap of a device held open succeeded"
grep -q "open by pid $HOLD" /tmp/depunmap2.out || fail "unmap of a device held open does not name the process"
netblk map --config $VOLS/dep.toml >/tmp/dep4.out 2>/tmp/dep4.log &
D4=$!
[ "$(wait_dev /tmp/dep4.out)" = "$DEV" ] || fail "map --config after a stop of a device held open did not recover it"
kill $HOLD; wait $HOLD 2>/dev/null
echo "ublk: SIGTERM with the device held open without O_EXCL leaves it (unmap names the process), map --config recovers it"
# Not in use any more: SIGTERM drains and unmaps, and the record goes.
kill -TERM $D4; wait $D4 || fail "SIGTERM of an unused device's daemon"
[ -e "$DEV" ] && fail "$DEV still there after SIGTERM with nothing mounted"
netblk list | grep -q " dep " && fail "the record of volume dep is left after the unmap"
echo "ublk: closed and unmounted, SIGTERM unmaps"

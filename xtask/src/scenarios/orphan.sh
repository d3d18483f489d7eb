# A device whose daemon died can still be unmapped.
netblk map --volume orphan --size 64M --nodes $NODES >/tmp/orphan.out 2>/tmp/orphan.log &
MAP=$!
ODEV=$(wait_dev /tmp/orphan.out)
[ -b "$ODEV" ] || fail "no device for the orphan volume"
kill -KILL $MAP
wait $MAP 2>/dev/null
netblk unmap "$ODEV" >/tmp/unmap4.out 2>&1 || { cat /tmp/unmap4.out; fail "unmap of a device whose daemon died"; }
[ -e "$ODEV" ] && fail "$ODEV still there after unmap"
netblk map --recover "$ODEV" >/tmp/rec3.out 2>/tmp/rec3.log && fail "recovering an unmapped device succeeded"
grep -q "no record" /tmp/rec3.log || { cat /tmp/rec3.log; fail "recovering an unmapped device is not a clear error"; }
echo "ublk: a device whose daemon died unmaps cleanly; recovering it afterwards is a clear error"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

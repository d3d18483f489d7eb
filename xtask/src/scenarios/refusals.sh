# Refusals leave no device behind.
netblk map --volume bad --size 64M --nodes 127.0.0.1:7001,127.0.0.1:7999 >/tmp/bad.out 2>/tmp/bad.log && fail "map with an unreachable node succeeded"
grep -q "node 1 (127.0.0.1:7999)" /tmp/bad.log || fail "the unreachable node is not named"
ls /dev/ublkb* 2>/dev/null && fail "a failed map left a device"
if [ "$EXPECT" = copy ]; then
  netblk map --volume bad --size 64M --nodes $NODES --zero-copy on >/tmp/bad.out 2>/tmp/bad.log && fail "--zero-copy on succeeded without AUTO_BUF_REG"
  grep -q AUTO_BUF_REG /tmp/bad.log || fail "--zero-copy on failed without saying why"
  ls /dev/ublkb* 2>/dev/null && fail "a failed map left a device"
fi
su nobody -s /bin/sh -c "netblk map --volume bad --size 64M --nodes $NODES" >/tmp/bad.out 2>/tmp/bad.log && fail "map as nobody succeeded"
grep -q "run as root" /tmp/bad.log || fail "no permission is not a clear error"
[ "$(wc -l < /tmp/bad.log)" -eq 1 ] || fail "the permission error is not one line"
echo "ublk: refused maps (unreachable node, no permission, zero copy unavailable) name the cause and leave no device"

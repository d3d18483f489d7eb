//! `cargo xtask vm-test`: boots real Debian kernels that have `ublk_drv`
//! under QEMU (software emulation) and runs netblk's scenario inside.
//! See ../shared/KERNEL.md for the recipe this follows.
//!
//! Downloads are cached outside the work tree (`$NETBLK_VM_CACHE`, default
//! `~/.cache/netblk-vm`), keyed by kernel version: a second run downloads
//! nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A kernel the matrix boots, and what netblk should find in it.
pub struct Kernel {
    /// Short name for `--kernel`.
    pub name: &'static str,
    pub version: &'static str,
    /// Debian packages holding the image and the modules.
    pub packages: &'static [&'static str],
    /// What the kernel is in the zero-copy table of DESIGN.md.
    pub expect: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.12",
        version: "6.12.117+deb13-amd64",
        packages: &["linux-image-6.12.117+deb13-amd64"],
        expect: "copy",
    },
    Kernel {
        name: "6.17",
        version: "6.17.13+deb13-amd64",
        packages: &["linux-image-6.17.13+deb13-amd64"],
        expect: "partial zero copy",
    },
    Kernel {
        name: "7.3",
        version: "7.3.4+deb13-amd64",
        packages: &[
            "linux-binary-7.3.4+deb13-amd64",
            "linux-modules-7.3.4+deb13-amd64",
        ],
        expect: "full zero copy",
    },
];

const SOURCES: &str = "deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
deb http://deb.debian.org/debian sid main
";

/// The script the guest runs after boot; its last line is the verdict.
const SCENARIO: &str = r#"
set -u
fail() { echo "NETBLK-VM-FAIL: $*"; for f in /tmp/*.log; do echo "--- $f"; cat "$f"; done; echo "NETBLK-VM-RESULT: fail"; poweroff -f; }
# wait_dev FILE: prints the device a map printed to FILE, once it is a block device.
wait_dev() { for i in $(seq 100); do d=$(head -n1 "$1" 2>/dev/null); [ -n "$d" ] && [ -b "$d" ] && { echo "$d"; return; }; sleep 0.1; done; }
# wait_listening FILE...: returns once each node said it listens (or 5 s each).
wait_listening() { for f in "$@"; do for i in $(seq 50); do grep -q listening "$f" && break; sleep 0.1; done; done; }
echo "== kernel $(uname -r)"
netblk features || fail "netblk features"
netblk ublk-check || fail "netblk ublk-check"
ls /dev/ublkc* /dev/ublkb* 2>/dev/null && fail "a device was left behind"

# Three mock nodes on loopback, a striped volume over them.
for p in 7001 7002 7003; do
  netblk-mock-node --listen 127.0.0.1:$p --store memory >/tmp/node$p.out 2>/tmp/node$p.log &
done
wait_listening /tmp/node7001.out /tmp/node7002.out /tmp/node7003.out
NODES=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003

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

netblk map --volume vm --size 1G --nodes $NODES --stripe-unit 64K --queues 2 >/tmp/map.out 2>/tmp/map.log &
MAP=$!
# The path is printed once the device is usable.
wait_dev /tmp/map.out >/dev/null
grep -q /dev/ublkb0 /tmp/map.out || fail "map did not print the device path"
[ -b /dev/ublkb0 ] || fail "no /dev/ublkb0 after map"
grep -q "data path: $EXPECT\$" /tmp/map.log || fail "expected the data path '$EXPECT'"
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

# ext4: files survive unmap and a fresh map of the same volume.
mkfs.ext4 -q -F /dev/ublkb0 || fail "mkfs.ext4"
mkdir -p /mnt && mount -t ext4 /dev/ublkb0 /mnt || fail "mount"
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/file$i bs=1M count=$((i * 5)) 2>/dev/null; done
sync
(cd /mnt && md5sum file1 file2 file3) > /tmp/sums
umount /mnt || fail "umount"
netblk list >/tmp/list.out || fail "netblk list"
grep -q "/dev/ublkb0 *vm *$EXPECT *live" /tmp/list.out || { cat /tmp/list.out; fail "list does not show the device live"; }
netblk unmap /dev/ublkb0 >/tmp/unmap.out 2>&1 || { cat /tmp/unmap.out; fail "unmap"; }
wait $MAP || fail "map exited with an error"
[ -e /dev/ublkb0 ] && fail "/dev/ublkb0 still there after unmap"
netblk unmap /dev/ublkb0 >/tmp/unmap2.out 2>&1 && fail "a second unmap succeeded"
grep -q "no netblk device 0" /tmp/unmap2.out || { cat /tmp/unmap2.out; fail "a second unmap is not a clear error"; }
echo "ublk: list shows the device; unmap removes it; a second unmap is a clear error"

netblk map --volume vm --size 1G --nodes $NODES --stripe-unit 64K --queues 2 >/tmp/map2.out 2>/tmp/map2.log &
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

# Reliability. Nodes with directory stores, so that one can be restarted.
for p in 7101 7102 7103; do
  mkdir -p /var/node$p
  netblk-mock-node --listen 127.0.0.1:$p --store dir:/var/node$p >/tmp/rnode$p.out 2>/tmp/rnode$p.log &
  eval "NODE$p=$!"
done
wait_listening /tmp/rnode7101.out /tmp/rnode7102.out /tmp/rnode7103.out
RNODES=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
netblk map --volume rel --size 512M --nodes $RNODES --stripe-unit 64K --queues 2 --node-down-timeout 3 >/tmp/rel.out 2>/tmp/rel.log &
MAP=$!
DEV=$(wait_dev /tmp/rel.out)
[ -b "$DEV" ] || fail "no device for the reliability volume"
mkfs.ext4 -q -F "$DEV" || fail "mkfs.ext4 (reliability)"
mount -t ext4 "$DEV" /mnt || fail "mount (reliability)"
# fio writes at a bounded rate (so it is still writing when the daemon
# dies), then verifies every block.
fio_on_ext4() {
  fio --name=$1 --directory=/mnt --ioengine=libaio --direct=1 --iodepth=16 \
      --rw=randwrite --bsrange=4k-256k --size=48M --rate=12m --verify=crc32c \
      --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/$1.log >/dev/null 2>&1
}

# 1. The daemon is killed -9 mid-workload and recovered: no error.
fio_on_ext4 kill9 &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the daemon was killed"
kill -KILL $MAP
sleep 0.5
netblk list >/tmp/list2.out || fail "netblk list (dead daemon)"
grep -q "$DEV *rel .*needs-recovery" /tmp/list2.out || { cat /tmp/list2.out; fail "list does not show needs-recovery"; }
netblk map --recover "$DEV" >/tmp/rec.out 2>/tmp/rec.log &
MAP=$!
wait $FIO || fail "fio across daemon kill -9 and recovery"
grep -q "err= 0" /tmp/kill9.log || fail "fio reported errors across the daemon restart"
grep -q "recovered $DEV" /tmp/rec.log || fail "recovery did not say so"
grep -q "data path: $EXPECT" /tmp/rec.log || fail "recovered with another data path"
netblk list >/tmp/list3.out || fail "netblk list (recovered)"
grep -q "$DEV *rel .*live" /tmp/list3.out || { cat /tmp/list3.out; fail "list does not show the recovered device live"; }
netblk map --recover "$DEV" >/tmp/rec2.out 2>/tmp/rec2.log && fail "recovering a served device succeeded"
grep -q "still running" /tmp/rec2.log || fail "recovering a served device is not a clear error"
echo "ublk: daemon kill -9 during fio on ext4, map --recover: fio verify clean"

# 2. A node is killed and restarted mid-workload: no error.
fio_on_ext4 nodekill &
FIO=$!
sleep 1.5
kill -0 $FIO 2>/dev/null || fail "fio ended before the node was killed"
kill -KILL $NODE7102
sleep 1
netblk-mock-node --listen 127.0.0.1:7102 --store dir:/var/node7102 >/tmp/rnode7102.out 2>/tmp/rnode7102b.log &
wait $FIO || fail "fio across a node kill and restart"
grep -q "err= 0" /tmp/nodekill.log || fail "fio reported errors across a node restart"
umount /mnt || fail "umount (reliability)"
e2fsck -fn "$DEV" >/tmp/fsck2.log 2>&1 || fail "e2fsck -fn after the daemon and node restarts"
echo "ublk: node kill -9 and restart during fio on ext4: fio verify clean; e2fsck -fn clean"

# 3. A node down past --node-down-timeout (3 s): EIO within the bound,
#    then the device works again once the node is back.
kill -KILL $NODE7103
T0=$(date +%s)
fio --name=down --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=8 --rw=write \
    --bs=1M --size=16M --output=/tmp/down.log >/dev/null 2>&1 && fail "IO to a dead node succeeded"
T1=$(date +%s)
grep -qi "input/output error" /tmp/down.log || fail "IO to a dead node did not fail with EIO"
[ $((T1 - T0)) -le 12 ] || fail "EIO took $((T1 - T0)) s with a 3 s node-down timeout"
netblk-mock-node --listen 127.0.0.1:7103 --store dir:/var/node7103 >/tmp/rnode7103.out 2>/tmp/rnode7103b.log &
OK=
for i in $(seq 40); do
  sleep 0.5
  dd if=/tmp/data of="$DEV" bs=1M count=16 oflag=direct 2>/dev/null && OK=1 && break
done
[ -n "$OK" ] || fail "the device did not work again after the node came back"
dd if="$DEV" of=/tmp/back2 bs=1M count=16 iflag=direct 2>/dev/null || fail "read after the node came back"
cmp /tmp/data /tmp/back2 || fail "data after the node came back differs"
echo "ublk: node down past its timeout: EIO after $((T1 - T0)) s (bound 12 s); usable again once back"
netblk unmap "$DEV" >/tmp/unmap3.out 2>&1 || { cat /tmp/unmap3.out; fail "unmap of the recovered device"; }
wait $MAP || fail "the recovered daemon exited with an error"
ls /dev/ublkb* 2>/dev/null && fail "a device was left behind"

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
echo "NETBLK-VM-RESULT: pass"
"#;

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn need_tools() -> Result<(), String> {
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "gzip",
        "xz",
        "dpkg-deb",
        "apt-get",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing host tools: {} (apt-get install qemu-system-x86 busybox-static cpio xz-utils fio e2fsprogs)",
            missing.join(", ")
        ))
    }
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NETBLK_VM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/netblk-vm")
}

/// Downloads (once) and unpacks (once) a kernel; returns (vmlinuz, the
/// unpacked tree).
fn fetch_kernel(cache: &Path, kernel: &Kernel) -> Result<(PathBuf, PathBuf), String> {
    let apt = cache.join("apt");
    let lists = apt.join("lists");
    fs::create_dir_all(lists.join("partial")).map_err(|e| e.to_string())?;
    fs::write(apt.join("sources.list"), SOURCES).map_err(|e| e.to_string())?;
    let opts = [
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/dev/null".to_string(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
    ];
    let debs = cache.join("debs").join(kernel.version);
    fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let have = |pkg: &str| {
        fs::read_dir(&debs)
            .map(|entries| {
                entries.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{pkg}_"))
                })
            })
            .unwrap_or(false)
    };
    let missing: Vec<&str> = kernel
        .packages
        .iter()
        .copied()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        let fresh = fs::read_dir(&lists).map(|d| d.count() > 1).unwrap_or(false);
        if !fresh {
            eprintln!("==> apt-get update (private state in {})", apt.display());
            run(
                Command::new("apt-get")
                    .args(&opts)
                    .arg("update")
                    .stdout(Stdio::null()),
                "apt-get update",
            )?;
        }
        eprintln!("==> downloading {}", missing.join(" "));
        run(
            Command::new("apt-get")
                .args(&opts)
                .arg("download")
                .args(&missing)
                .current_dir(&debs),
            "apt-get download",
        )?;
    }
    let root = cache.join("kernels").join(kernel.version);
    let marker = root.join(".unpacked");
    if !marker.exists() {
        fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        for entry in fs::read_dir(&debs).map_err(|e| e.to_string())?.flatten() {
            run(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(entry.path())
                    .arg(&root),
                "dpkg-deb -x",
            )?;
        }
        fs::write(&marker, "").map_err(|e| e.to_string())?;
    }
    let vmlinuz = find_file(&root, &["vmlinuz", &format!("vmlinuz-{}", kernel.version)])
        .ok_or_else(|| format!("no vmlinuz in {}", root.display()))?;
    Ok((vmlinuz, root))
}

/// The first file under `root` with one of these names.
fn find_file(root: &Path, names: &[&str]) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if names
                .iter()
                .any(|n| entry.file_name().to_string_lossy() == *n)
            {
                return Some(path);
            }
        }
    }
    None
}

/// A module's contents, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !out.status.success() {
            return Err(format!("xz -d {} failed", path.display()));
        }
        Ok(out.stdout)
    } else {
        fs::read(path).map_err(|e| e.to_string())
    }
}

/// Module `name` and everything it depends on, dependencies first, read from
/// each module's `depends=` field (the packages ship no modules.dep).
fn modules_with_deps(
    root: &Path,
    name: &str,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), String> {
    if out.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let files = [
        format!("{name}.ko.xz"),
        format!("{name}.ko"),
        format!("{}.ko.xz", name.replace('_', "-")),
    ];
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let path = find_file(root, &names).ok_or_else(|| format!("module {name} not found"))?;
    let bytes = module_bytes(&path)?;
    let depends = bytes
        .split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|d| String::from_utf8_lossy(d).to_string())
        .unwrap_or_default();
    for dep in depends.split(',').filter(|d| !d.is_empty()) {
        modules_with_deps(root, dep, out)?;
    }
    out.push((name.to_string(), bytes));
    Ok(())
}

/// Builds the guest's binaries: static, so they need no libraries.
fn build_static(root: &Path) -> Result<PathBuf, String> {
    let target = "x86_64-unknown-linux-gnu";
    eprintln!("==> building static netblk binaries");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                target,
                "-p",
                "netblk",
                "-p",
                "netblk-mock-node",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(root),
        "static build",
    )?;
    Ok(root.join("target").join(target).join("release"))
}

fn make_initramfs(
    work: &Path,
    bins: &Path,
    kernel_root: &Path,
    expect: &str,
    script: &str,
) -> Result<PathBuf, String> {
    let stage = work.join("stage");
    let _ = fs::remove_dir_all(&stage);
    for dir in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "lib/modules",
    ] {
        fs::create_dir_all(stage.join(dir)).map_err(|e| e.to_string())?;
    }
    let busybox = which("busybox")?;
    fs::copy(&busybox, stage.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    for bin in ["netblk", "netblk-mock-node"] {
        // The demo finds the mock node beside netblk, as in an install.
        fs::copy(bins.join(bin), stage.join("bin").join(bin)).map_err(|e| format!("{bin}: {e}"))?;
    }
    // Test tools from the host, with the libraries they load.
    for tool in ["fio", "mkfs.ext4", "e2fsck"] {
        copy_with_libs(&which(tool)?, &stage)?;
    }
    let mut modules = Vec::new();
    for name in ["ublk_drv", "ext4"] {
        modules_with_deps(kernel_root, name, &mut modules)?;
    }
    // ext4 asks the crypto API for crc32c; older kernels have it as a module.
    for name in ["crc32c_generic", "crc32c_intel"] {
        if modules_with_deps(kernel_root, name, &mut modules).is_err() {
            eprintln!("    (no {name} module in this kernel)");
        }
    }
    let mut insmods = String::new();
    for (name, bytes) in &modules {
        fs::write(stage.join(format!("lib/modules/{name}.ko")), bytes)
            .map_err(|e| e.to_string())?;
        insmods.push_str(&format!(
            "insmod /lib/modules/{name}.ko || echo 'NETBLK-VM-FAIL: insmod {name}'\n"
        ));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox echo {INIT_MARKER}\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\nip link set lo up\n\
         mkdir -p /etc && echo 'root:x:0:0::/:/bin/sh' > /etc/passwd && \
         echo 'nobody:x:65534:65534::/:/bin/sh' >> /etc/passwd && \
         printf 'root:x:0:\\nnogroup:x:65534:\\n' > /etc/group\n\
         {insmods}export PATH=/bin:/sbin RUST_LOG=warn EXPECT='{expect}'\n{script}\npoweroff -f\n"
    );
    let init_path = stage.join("init");
    fs::write(&init_path, init).map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(&init_path), "chmod")?;
    let initrd = work.join("initrd.gz");
    run(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
                initrd.display()
            ))
            .current_dir(&stage),
        "cpio",
    )?;
    Ok(initrd)
}

/// Copies a dynamically linked program into the guest's /bin, and every
/// library `ldd` lists to the same path in the guest.
fn copy_with_libs(program: &Path, stage: &Path) -> Result<(), String> {
    let name = program.file_name().ok_or("program without a name")?;
    fs::copy(program, stage.join("bin").join(name))
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let dest = stage.join(path.trim_start_matches('/'));
        if dest.exists() {
            continue;
        }
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        fs::copy(path, &dest).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf, String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        Err(format!("{tool} not found"))
    } else {
        Ok(PathBuf::from(path))
    }
}

/// Boots the kernel with the initramfs; returns the serial console output.
fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<String, String> {
    let out = fs::File::create(log).map_err(|e| e.to_string())?;
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "2",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("qemu: {e}"))?;
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let text = fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "the guest did not finish within {timeout:?}; its log:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(fs::read_to_string(log).unwrap_or_default())
}

/// What the guest runs for `cargo xtask vm-demo`: `netblk demo`, used the way
/// its output suggests, then stopped with Ctrl-C (SIGINT).
const DEMO: &str = r##"
fail() { echo "NETBLK-VM-FAIL: $*"; cat /tmp/demo.log; echo "NETBLK-VM-RESULT: fail"; poweroff -f; }
echo "== netblk demo inside a $(uname -r) guest"
netblk demo >/tmp/demo.out 2>/tmp/demo.log &
DEMO=$!
for i in $(seq 100); do DEV=$(head -n1 /tmp/demo.out 2>/dev/null); [ -n "$DEV" ] && [ -b "$DEV" ] && break; sleep 0.1; done
[ -b "$DEV" ] || fail "demo did not print a device"
sed 1d /tmp/demo.out
echo "# mkfs.ext4 $DEV && mount $DEV /mnt/netblk"
mkfs.ext4 -q -F "$DEV" || fail mkfs
mkdir -p /mnt/netblk && mount -t ext4 "$DEV" /mnt/netblk || fail mount
echo "hello from netblk" > /mnt/netblk/hello.txt
dd if=/dev/urandom of=/mnt/netblk/blob bs=1M count=32 2>/dev/null
SUM=$(md5sum /mnt/netblk/blob | cut -d' ' -f1)
sync; umount /mnt/netblk; echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$DEV" /mnt/netblk || fail remount
echo "# cat /mnt/netblk/hello.txt"; cat /mnt/netblk/hello.txt
[ "$(md5sum /mnt/netblk/blob | cut -d' ' -f1)" = "$SUM" ] || fail "32 MiB blob changed"
echo "# 32 MiB written, unmounted, remounted: checksum matches"
df -h /mnt/netblk | tail -1
umount /mnt/netblk
netblk list
kill -INT $DEMO; wait $DEMO || fail "demo exited with an error"
cat /tmp/demo.out | tail -1
ls /dev/ublkb* 2>/dev/null && fail "the demo left a device"
echo "NETBLK-VM-RESULT: pass"
"##;

/// The first line the guest's init prints.
const INIT_MARKER: &str = "NETBLK-VM-INIT";

/// Fetches `kernel`, builds an initramfs running `script` in `work`, boots
/// it, and returns the console output.
fn run_guest(work: &Path, bins: &Path, kernel: &Kernel, script: &str) -> Result<String, String> {
    let (vmlinuz, kernel_root) = fetch_kernel(&cache_dir(), kernel)?;
    fs::create_dir_all(work).map_err(|e| e.to_string())?;
    let initrd = make_initramfs(work, bins, &kernel_root, kernel.expect, script)?;
    // Under software emulation a guest kernel occasionally oopses while
    // booting (seen: int3 in sched_clock_cpu on 6.17), before any of our code
    // runs. That is the harness, not netblk: boot again, at most twice more.
    let mut attempt = 1;
    loop {
        let log = boot(
            &vmlinuz,
            &initrd,
            &work.join("console.log"),
            Duration::from_secs(600),
        )?;
        if log.contains(INIT_MARKER) || attempt == 3 {
            return Ok(log);
        }
        eprintln!(
            "    the guest kernel died before reaching userspace (attempt {attempt}); booting again"
        );
        attempt += 1;
    }
}

/// Boots one kernel (7.3 by default) and runs `netblk demo` in it, showing
/// what a user would see.
pub fn vm_demo(root: &Path, only: Option<&str>) -> Result<(), String> {
    need_tools()?;
    let kernel = KERNELS
        .iter()
        .find(|k| k.name == only.unwrap_or("7.3"))
        .ok_or("unknown kernel")?;
    let bins = build_static(root)?;
    eprintln!(
        "==> booting {} under QEMU (software emulation)",
        kernel.version
    );
    let work = root.join("target/vm-demo").join(kernel.name);
    let log = run_guest(&work, &bins, kernel, DEMO)?;
    let shown = log.lines().skip_while(|l| !l.contains("== netblk demo"));
    for line in shown.filter(|l| !l.contains("reboot: Power down")) {
        println!("{line}");
    }
    if log.contains("NETBLK-VM-RESULT: pass") {
        Ok(())
    } else {
        Err(format!(
            "the demo failed; console log in {}",
            work.join("console.log").display()
        ))
    }
}

/// The kernel `name` at another Debian package version than the pinned one
/// (for example `7.3.5+deb13-amd64`).
fn with_version(name: &str, version: &str) -> Result<Kernel, String> {
    let pinned = KERNELS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| format!("--version needs --kernel, one of {}", kernel_names()))?;
    let version: &'static str = Box::leak(version.to_string().into_boxed_str());
    // 7.x packages split the image and the modules; 6.x ship one package.
    let packages: Vec<&'static str> = if version.starts_with("6.") {
        vec![Box::leak(format!("linux-image-{version}").into_boxed_str())]
    } else {
        vec![
            Box::leak(format!("linux-binary-{version}").into_boxed_str()),
            Box::leak(format!("linux-modules-{version}").into_boxed_str()),
        ]
    };
    Ok(Kernel {
        name: pinned.name,
        version,
        packages: Box::leak(packages.into_boxed_slice()),
        expect: pinned.expect,
    })
}

fn kernel_names() -> String {
    KERNELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the scenario on the chosen kernels (all by default), optionally at
/// another package version than the pinned one.
pub fn vm_test(root: &Path, only: Option<&str>, version: Option<&str>) -> Result<(), String> {
    need_tools()?;
    let overridden;
    let kernels: Vec<&Kernel> = match (only, version) {
        (Some(name), Some(version)) => {
            overridden = with_version(name, version)?;
            vec![&overridden]
        }
        (None, Some(_)) => {
            return Err(format!(
                "--version needs --kernel, one of {}",
                kernel_names()
            ));
        }
        _ => KERNELS
            .iter()
            .filter(|k| only.is_none_or(|o| o == k.name))
            .collect(),
    };
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        return Err(format!("unknown kernel; choose from {}", names.join(", ")));
    }
    let bins = build_static(root)?;
    let mut failed = Vec::new();
    for kernel in kernels {
        eprintln!(
            "==> kernel {} ({}, expected: {})",
            kernel.name, kernel.version, kernel.expect
        );
        let started = Instant::now();
        let log = run_guest(
            &root.join("target/vm").join(kernel.name),
            &bins,
            kernel,
            SCENARIO,
        )?;
        let verdict = if log.contains("NETBLK-VM-RESULT: pass") {
            "pass"
        } else {
            "FAIL"
        };
        eprintln!(
            "<== kernel {}: {verdict} in {:.1?}",
            kernel.name,
            started.elapsed()
        );
        if verdict == "pass" {
            for line in log
                .lines()
                .filter(|l| l.starts_with("ublk") || l.starts_with("io_uring"))
            {
                eprintln!("    {line}");
            }
        } else {
            eprintln!("---- guest log ({})\n{log}\n----", kernel.name);
            failed.push(kernel.name);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("vm-test failed on kernel(s) {}", failed.join(", ")))
    }
}

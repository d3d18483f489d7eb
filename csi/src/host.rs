//! What the node service does to this host beside mapping: which
//! filesystem a device holds, mkfs, mounts and bind mounts (by system call,
//! so the plugin needs no mount binary), growing a filesystem, usage.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What a device holds, by the signatures netblk formats with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Every byte of [`blank_regions`] is zero: no signature that blkid
    /// or wipefs would find (a new netblk volume, or one never given any).
    Blank,
    Ext4,
    Xfs,
    /// Something else: not to be formatted over.
    Other,
}

impl Content {
    pub fn fs_name(self) -> &'static str {
        match self {
            Content::Ext4 => "ext4",
            Content::Xfs => "xfs",
            Content::Blank => "nothing",
            Content::Other => "data that is neither ext4 nor xfs",
        }
    }
}

/// How much of each end of a device the blank test reads.
pub const BLANK_SPAN: u64 = 1 << 20;
/// btrfs's first mirror superblock (its primary is at 64 KiB).
const BTRFS_MIRROR: (u64, u64) = (64 << 20, 4096);

/// Where a device of `size` bytes is read to tell it blank, as (offset,
/// length), in order, within the device: the first and the last MiB, where
/// blkid and wipefs find the signatures of filesystems, partition tables,
/// RAID and volume managers (btrfs's superblock at 64 KiB, ZFS's labels at
/// both ends, GPT's backup header and md's 0.90/1.0 superblocks at the
/// end), and btrfs's first mirror superblock at 64 MiB. The first 64 KiB
/// alone miss most of them.
pub fn blank_regions(size: u64) -> Vec<(u64, u64)> {
    let head = (0, size.min(BLANK_SPAN));
    let mut regions = vec![head];
    let (mirror, len) = BTRFS_MIRROR;
    if mirror + len <= size.saturating_sub(BLANK_SPAN) {
        regions.push(BTRFS_MIRROR);
    }
    let tail = size.saturating_sub(BLANK_SPAN).max(head.1);
    if tail < size {
        regions.push((tail, size - tail));
    }
    regions
}

/// Reads what `head` (the start of a device, 64 KiB or more) says it
/// holds; `rest_zero`: the device's other [`blank_regions`] are zero.
pub fn content_of(head: &[u8], rest_zero: bool) -> Content {
    // ext2/3/4: the superblock at 1024, its magic 0xEF53 at offset 56.
    if head.get(1080..1082) == Some(&[0x53, 0xef]) {
        return Content::Ext4;
    }
    if head.get(0..4) == Some(b"XFSB") {
        return Content::Xfs;
    }
    if rest_zero && head.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    Content::Other
}

/// What the device (or image file) at `dev` holds.
pub fn probe(dev: &str) -> io::Result<Content> {
    let mut file = File::open(dev)?;
    let size = match file.metadata()? {
        m if m.file_type().is_block_device() => device_size(Path::new(dev))?,
        m => m.len(),
    };
    let mut regions = blank_regions(size).into_iter();
    let mut head = Vec::new();
    if let Some((_, len)) = regions.next() {
        (&mut file).take(len).read_to_end(&mut head)?;
    }
    let mut rest_zero = true;
    let mut buf = Vec::new();
    for (offset, len) in regions {
        file.seek(SeekFrom::Start(offset))?;
        buf.clear();
        (&mut file).take(len).read_to_end(&mut buf)?;
        rest_zero &= buf.iter().all(|&b| b == 0);
    }
    Ok(content_of(&head, rest_zero))
}

/// Runs `program ARGS` to its end; the error carries its output.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

/// Makes a `fs` filesystem on `dev` (the volume is blank: no discard).
pub fn mkfs(fs: &str, dev: &str) -> Result<(), String> {
    match fs {
        "ext4" => run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", dev]),
        "xfs" => run("mkfs.xfs", &["-q", "-K", dev]),
        other => Err(format!("cannot make a '{other}' filesystem")),
    }
}

/// Grows the `fs` filesystem on `dev`, mounted at `mount`, to the device.
pub fn grow_fs(fs: Content, dev: &str, mount: &Path) -> Result<(), String> {
    match fs {
        Content::Ext4 => run("resize2fs", &[dev]),
        Content::Xfs => run("xfs_growfs", &[&mount.to_string_lossy()]),
        other => Err(format!("{dev} holds {}: nothing to grow", other.fs_name())),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device's `major:minor`.
    pub dev: (u32, u32),
    /// The path within the filesystem that is mounted (`/ublkb3` for a
    /// bind mount of a device node out of devtmpfs).
    pub root: String,
    pub point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (major, minor) = f.get(2)?.split_once(':')?;
            Some(Mount {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                root: unescape(f.get(3)?),
                point: PathBuf::from(unescape(f.get(4)?)),
                fs_type: (*r.first()?).to_string(),
                source: unescape(r.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// This process's mounts.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// What is mounted at `path` (the topmost mount), if anything.
pub fn mounted_at(path: &Path) -> Option<Mount> {
    let path = path.canonicalize().ok()?;
    mounts().into_iter().rev().find(|m| m.point == path)
}

/// The `major:minor` of the block device at `dev`.
pub fn dev_number(dev: &str) -> io::Result<(u32, u32)> {
    let meta = std::fs::metadata(dev)?;
    if !meta.file_type().is_block_device() {
        return Err(io::Error::other(format!("{dev} is not a block device")));
    }
    let rdev = meta.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// Where the device `dev` (`/dev/ublkbN`) is in use by mounts: filesystems
/// on it, and bind mounts of its device node.
pub fn uses_of(dev: &str) -> Vec<PathBuf> {
    let number = dev_number(dev).ok();
    let node = dev.trim_start_matches("/dev");
    mounts()
        .into_iter()
        .filter(|m| Some(m.dev) == number || (m.fs_type == "devtmpfs" && m.root == node))
        .map(|m| m.point)
        .collect()
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// mount(2) with errors that name the paths.
fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    fs_type: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let what = || format!("mounting {:?} at {}", source, target.display());
    let source = source
        .map(cstr)
        .transpose()
        .map_err(|e| format!("{}: {e}", what()))?;
    let target_c = cstr(target).map_err(|e| format!("{}: {e}", what()))?;
    let fs_type = fs_type
        .map(CString::new)
        .transpose()
        .map_err(|e| format!("{}: {e}", what()))?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|e| format!("{}: {e}", what()))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fs_type.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("{}: {}", what(), io::Error::last_os_error()))
    }
}

/// Splits mount options into mount(2) flags and the filesystem's own.
pub fn mount_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for option in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
        match option {
            "" | "rw" | "defaults" => {}
            "ro" => flags |= libc::MS_RDONLY,
            "noatime" => flags |= libc::MS_NOATIME,
            "nodiratime" => flags |= libc::MS_NODIRATIME,
            "relatime" => flags |= libc::MS_RELATIME,
            "strictatime" => flags |= libc::MS_STRICTATIME,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            "sync" => flags |= libc::MS_SYNCHRONOUS,
            "dirsync" => flags |= libc::MS_DIRSYNC,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts the `fs_type` filesystem on `dev` at `target` with `options`.
pub fn mount_fs(dev: &str, target: &Path, fs_type: &str, options: &[String]) -> Result<(), String> {
    let (flags, data) = mount_options(options);
    sys_mount(
        Some(Path::new(dev)),
        target,
        Some(fs_type),
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

/// Bind-mounts `source` at `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), String> {
    sys_mount(Some(source), target, None, libc::MS_BIND, None)?;
    if readonly {
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        if let Err(why) = sys_mount(None, target, None, ro, None) {
            let _ = unmount(target);
            return Err(why);
        }
    }
    Ok(())
}

/// Unmounts `target`; not mounted is no error.
pub fn unmount(target: &Path) -> Result<(), String> {
    if mounted_at(target).is_none() {
        return Ok(());
    }
    let c = cstr(target).map_err(|e| format!("unmounting {}: {e}", target.display()))?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "unmounting {}: {}",
            target.display(),
            io::Error::last_os_error()
        ))
    }
}

/// Bytes and inodes of the filesystem at `path`: (total, available, used)
/// for each.
pub fn usage(path: &Path) -> io::Result<[(u64, u64, u64); 2]> {
    let c = cstr(path)?;
    // SAFETY: statvfs is plain data; zeroed is a valid value of it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill, both live.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize;
    Ok([
        (
            st.f_blocks * unit,
            st.f_bavail * unit,
            (st.f_blocks - st.f_bfree) * unit,
        ),
        (st.f_files, st.f_favail, st.f_files - st.f_ffree),
    ])
}

/// The size of the block device at `dev`, bytes.
pub fn device_size(dev: &Path) -> io::Result<u64> {
    let file = File::open(dev)?;
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the fd is open for the call and `size` is the u64 the ioctl
    // writes.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            BLKGETSIZE64,
            &mut size,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_told_by_signature() {
        let mut head = vec![0u8; 64 << 10];
        assert_eq!(content_of(&head, true), Content::Blank);
        assert_eq!(content_of(&head, false), Content::Other, "data further on");
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(content_of(&head, true), Content::Ext4);
        let mut head = vec![0u8; 64 << 10];
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(content_of(&head, true), Content::Xfs);
        let mut head = vec![0u8; 64 << 10];
        head[510] = 0x55;
        head[511] = 0xaa;
        assert_eq!(content_of(&head, true), Content::Other, "a partition table");
    }

    #[test]
    fn the_blank_test_reads_both_ends_and_the_btrfs_mirror() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            blank_regions(1 << 30),
            [(0, MIB), (64 * MIB, 4096), ((1 << 30) - MIB, MIB)]
        );
        assert_eq!(blank_regions(3 * MIB), [(0, MIB), (2 * MIB, MIB)]);
        assert_eq!(blank_regions(MIB + 4096), [(0, MIB), (MIB, 4096)]);
        assert_eq!(blank_regions(64 << 10), [(0, 64 << 10)]);
    }

    /// A signature anywhere the blank test reads makes a device not blank:
    /// btrfs at 64 KiB (past what the test used to read), a GPT backup
    /// header in the last sector, btrfs's mirror at 64 MiB.
    #[test]
    fn a_signature_past_64_kib_is_not_blank() {
        let dir = tempfile::tempdir().expect("dir");
        let image = dir.path().join("disk.img");
        let size: u64 = 128 << 20;
        for (at, what) in [
            (None, "nothing"),
            (Some(0x1_0040), "btrfs magic"),
            (Some(size - 512), "GPT backup header"),
            (Some((64 << 20) + 0x40), "btrfs mirror"),
        ] {
            let file = File::create(&image).expect("image");
            file.set_len(size).expect("size");
            if let Some(at) = at {
                std::os::unix::fs::FileExt::write_all_at(&file, b"_BHRfS_M", at).expect("write");
            }
            let want = if at.is_none() {
                Content::Blank
            } else {
                Content::Other
            };
            assert_eq!(
                probe(&image.to_string_lossy()).expect("probe"),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn mountinfo_lines_are_parsed_and_unescaped() {
        let text = "\
36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/ublkb0 rw,errors=continue
37 35 0:5 /ublkb0 /var/lib/kubelet/pods/x/vol rw shared:2 - devtmpfs udev rw
bad line
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].dev, (98, 0));
        assert_eq!(mounts[0].point, PathBuf::from("/mnt/a b"));
        assert_eq!(mounts[0].fs_type, "ext4");
        assert_eq!(mounts[0].source, "/dev/ublkb0");
        assert_eq!(mounts[1].root, "/ublkb0");
        assert_eq!(mounts[1].fs_type, "devtmpfs");
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let (flags, data) = mount_options(&["noatime,ro".into(), "discard".into(), "".into()]);
        assert_eq!(flags, libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!(data, "discard");
        assert_eq!(mount_options(&[]), (0, String::new()));
    }
}

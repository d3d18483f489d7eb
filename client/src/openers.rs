//! Which processes hold a file open, found as `fuser` finds them: every
//! `/proc/PID/fd/N` that is the file asked about. For a device node that
//! is any open of the same device (block or character, same device number)
//! through whichever node; for any other file, the same inode.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// A process holding the file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opener {
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`; empty if it could not be read).
    pub command: String,
}

impl std::fmt::Display for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// What makes two opens the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Device { block: bool, rdev: u64 },
    Inode { dev: u64, ino: u64 },
}

fn key(meta: &std::fs::Metadata) -> Key {
    let kind = meta.file_type();
    if kind.is_block_device() || kind.is_char_device() {
        Key::Device {
            block: kind.is_block_device(),
            rdev: meta.rdev(),
        }
    } else {
        Key::Inode {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Every process (this one included) with a descriptor open on `path`'s
/// file, in pid order. Processes that end or whose descriptors cannot be
/// read (another user's, without privilege) while the scan runs are
/// passed over.
pub fn openers(path: &Path) -> io::Result<Vec<Opener>> {
    let want = key(&std::fs::metadata(path)?);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        // metadata() follows the descriptor's link to the open file itself.
        let holds = fds
            .flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| key(&m) == want));
        if holds {
            let command = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_default();
            found.push(Opener { pid, command });
        }
    }
    found.sort_by_key(|o| o.pid);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_file_is_found_and_a_closed_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file");
        std::fs::write(&path, b"x").expect("write");
        let me = std::process::id();
        let mine = |path: &Path| openers(path).expect("scan").iter().any(|o| o.pid == me);
        assert!(!mine(&path));
        let held = std::fs::File::open(&path).expect("open");
        assert!(mine(&path));
        // Another file (another inode) is not this one.
        let other = dir.path().join("other");
        std::fs::write(&other, b"x").expect("write");
        assert!(!mine(&other));
        drop(held);
        assert!(!mine(&path));
    }

    /// A device is found through any of its nodes: here a node made with
    /// mknod for the device `/dev/null` is (skipped without the privilege).
    #[test]
    fn a_device_is_found_through_another_node_of_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("null");
        let rdev = std::fs::metadata("/dev/null").expect("/dev/null").rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let made = std::process::Command::new("mknod")
            .arg(&node)
            .args(["c", &major.to_string(), &minor.to_string()])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: cannot mknod {}", node.display());
            return;
        }
        let _held = std::fs::File::open("/dev/null").expect("open");
        let me = std::process::id();
        let found = openers(&node).expect("scan");
        assert!(found.iter().any(|o| o.pid == me), "{found:?}");
        // The node itself is not held: a file of another kind is not it.
        assert!(
            !openers(dir.path())
                .expect("scan")
                .iter()
                .any(|o| o.pid == me)
        );
    }
}

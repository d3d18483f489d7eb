//! A lock per device record: `ublkN.lock` beside the record `ublkN` in the
//! state directory, held (`flock`) by whoever is making a new daemon for
//! the device, from reading its record until the new daemon has written
//! its own, so that two `map --recover` runs of one device never race
//! (the second waits, then finds the device served). The kernel drops the
//! lock with its holder, crashed or not.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiter tries the lock again.
const POLL: Duration = Duration::from_millis(50);

/// The lock of one device record, held until dropped.
#[derive(Debug)]
pub struct RecordLock {
    _file: File,
}

/// Where device `id`'s lock is in `dir`.
pub fn lock_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("ublk{id}.lock"))
}

/// Takes device `id`'s lock in `dir` (which must exist: it holds the
/// record), waiting up to `wait` for another holder to let go; `waiting`
/// is called once if it has to wait.
pub fn lock(
    dir: &Path,
    id: u32,
    wait: Duration,
    waiting: impl FnOnce(),
) -> Result<RecordLock, String> {
    let path = lock_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| format!("cannot open the lock {}: {e}", path.display()))?;
    let deadline = Instant::now() + wait;
    let mut waiting = Some(waiting);
    loop {
        match try_flock(&file) {
            Ok(true) => return Ok(RecordLock { _file: file }),
            Ok(false) if Instant::now() < deadline => {
                if let Some(say) = waiting.take() {
                    say();
                }
                std::thread::sleep(POLL);
            }
            Ok(false) => {
                return Err(format!(
                    "{} is still held by another netblk (a recovery of /dev/ublkb{id}) after {} s",
                    path.display(),
                    wait.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

/// An exclusive `flock` without waiting: false if another holds it.
fn try_flock(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor `file` owns, with constant flags;
        // it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => {}
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_waiter_gets_it_when_it_is_let_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = lock(dir.path(), 3, Duration::ZERO, || {}).expect("free");
        let err = lock(dir.path(), 3, Duration::from_millis(100), || {}).expect_err("held");
        assert!(err.contains("still held"), "{err}");
        // Another device's lock is its own.
        let _other = lock(dir.path(), 4, Duration::ZERO, || {}).expect("another device");
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        let mut waited = false;
        let second = lock(dir.path(), 3, Duration::from_secs(10), || waited = true);
        assert!(second.is_ok(), "{second:?}");
        assert!(waited, "it said it waits");
        released.join().expect("thread");
    }
}

//! Two `netblk map --recover` runs of one device are serialized by the
//! lock beside its record: while another holds it, a recovery waits (and
//! says so) before it reads the record or touches the kernel.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netblk::record_lock;
use netblk::state::{self, DeviceRecord};
use netblk_tests::{netblk_bin, sample_record};

/// A record of device 7 whose daemon is gone.
fn record() -> DeviceRecord {
    let mut gone = Command::new("true").spawn().expect("true");
    let pid = gone.id();
    gone.wait().expect("wait");
    sample_record(pid)
}

#[test]
fn a_recovery_waits_for_the_one_in_progress() {
    let dir = tempfile::tempdir().expect("state dir");
    state::save(dir.path(), &record()).expect("save");
    let held = record_lock::lock(dir.path(), 7, Duration::ZERO, || {}).expect("lock");
    let log = dir.path().join("recover.log");
    let mut child = Command::new(netblk_bin())
        .args(["map", "--recover", "/dev/ublkb7"])
        .env("NETBLK_STATE_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("netblk map --recover");
    std::thread::sleep(Duration::from_millis(1500));
    let early = child.try_wait().expect("try_wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if early.is_some() {
        panic!("map --recover went on while another recovery held the lock: {text}");
    }
    assert!(text.contains("waiting"), "it says it waits: {text}");
    drop(held);
    // Now it goes on (and, on a host without ublk, fails there).
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "map --recover still waits after the lock was let go"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("still held"), "{text}");
}

//! `netblk map --recover` refusals that need no kernel: they are decided from
//! the state record before ublk is touched. (Recovery itself runs in the VM:
//! `cargo xtask vm-test`.)

use std::process::{Command, Output};

fn netblk(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args(args)
        .env("NETBLK_STATE_DIR", state)
        .output()
        .expect("run netblk")
}

/// When `pid` started, from `/proc/PID/stat` (field 22).
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(')').expect("comm");
    rest.split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .expect("start time")
}

fn record(pid: u32, start: u64, volume: &str) -> String {
    format!(
        "netblk-device 2\nid 7\nvolume {volume}\nsize 67108864\nstripe_unit 65536\n\
         nodes 127.0.0.1:7001,127.0.0.1:7002\nqueues 1\ndepth 64\nblock_size 512\n\
         data_path copy\npid {pid}\npid_start {start}\nclient_id netblk-1-ab\ngeneration 0\nio_timeout 30\n\
         node_down_timeout 15\nsend zc\nvolume_ids \n"
    )
}

#[test]
fn recover_without_a_record_is_a_clear_error() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = netblk(state.path(), &["map", "--recover", "/dev/ublkb7"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no record of /dev/ublkb7"), "{stderr}");
}

#[test]
fn recover_refuses_a_device_whose_daemon_still_runs() {
    let state = tempfile::tempdir().expect("tempdir");
    // This test process stands in for a live daemon.
    let me = std::process::id();
    std::fs::write(state.path().join("ublk7"), record(me, start_time(me), "v")).expect("record");
    let out = netblk(state.path(), &["map", "--recover", "7"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("still running"), "{stderr}");
}

#[test]
fn a_reused_pid_is_not_the_daemon() {
    let state = tempfile::tempdir().expect("tempdir");
    // Our pid, but another start time: the daemon died and its pid was
    // reused. Recovery goes on (and fails later here: no ublk on the host,
    // or no node at these addresses), instead of refusing.
    let me = std::process::id();
    std::fs::write(
        state.path().join("ublk7"),
        record(me, start_time(me) + 1, "v"),
    )
    .expect("record");
    let out = netblk(state.path(), &["map", "--recover", "7"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("still running"), "{stderr}");
}

#[test]
fn recover_refuses_options_that_differ_from_the_record() {
    let state = tempfile::tempdir().expect("tempdir");
    // A pid that cannot be alive: above the kernel's pid_max limit.
    std::fs::write(state.path().join("ublk7"), record(4_194_305, 0, "v")).expect("record");
    let out = netblk(
        state.path(),
        &["map", "--recover", "7", "--volume", "other"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--volume differs"), "{stderr}");
    let out = netblk(
        state.path(),
        &[
            "map",
            "--recover",
            "7",
            "--nodes",
            "127.0.0.1:7002,127.0.0.1:7001",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--nodes differs"), "{stderr}");
}

#[test]
fn map_without_volume_or_recover_is_a_usage_error() {
    let state = tempfile::tempdir().expect("tempdir");
    let out = netblk(state.path(), &["map", "--size", "1G"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--volume"), "{stderr}");
}

#[test]
fn status_shows_a_device_whose_daemon_is_gone_from_its_record() {
    let state = tempfile::tempdir().expect("tempdir");
    // A daemon that is gone: a pid with another start time.
    let me = std::process::id();
    std::fs::write(state.path().join("ublk7"), record(me, 1, "kept")).expect("record");
    let out = netblk(state.path(), &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let devices: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let d = &devices[0];
    assert_eq!(d["device"], "/dev/ublkb7");
    assert_eq!(d["volume"], "kept");
    assert_eq!(d["data_path"], "copy");
    assert_ne!(d["state"], "live");
    assert_eq!(d["nodes"][1]["address"], "127.0.0.1:7002");
    let text = netblk(state.path(), &["status", "7"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("/dev/ublkb7  volume kept  data path copy"),
        "{stdout}"
    );
    let none = netblk(state.path(), &["status", "9"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no netblk device 9"));
}

//! Bad input and bad state on the command line, decided before anything
//! starts (no kernel, no node needed): every number out of range is a usage
//! error (exit status 2) that says what is wrong, never a panic; bad device
//! records are named, and `list` still shows the good ones.

use std::path::Path;
use std::process::{Command, Output};

fn netblk(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args(args)
        .env("NETBLK_STATE_DIR", state)
        .output()
        .expect("run netblk")
}

const MAX: &str = "18446744073709551615";

/// Runs `base` + each case's arguments and checks that it is refused with
/// exit status 2 and the case's text, without a panic.
fn refused(base: &[&str], cases: &[(&[&str], &str)]) {
    let state = tempfile::tempdir().expect("tempdir");
    for (args, says) in cases {
        let all: Vec<&str> = base.iter().chain(args.iter()).copied().collect();
        let out = netblk(state.path(), &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {stderr}");
        assert!(
            stderr.contains(says) && !stderr.contains("panicked"),
            "{all:?}: expected {says:?} in {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_dir(state.path()).expect("state").count(),
        0,
        "nothing was recorded"
    );
}

const MAP: &[&str] = &[
    "map",
    "--volume",
    "v",
    "--nodes",
    "127.0.0.1:9,127.0.0.1:10",
];

#[test]
fn map_refuses_numbers_out_of_range() {
    let mut map = MAP.to_vec();
    map.extend(["--size", "64M"]);
    refused(
        &map,
        &[
            (
                &["--io-timeout", "0"],
                "io timeout 0 s must be from 1 to 3600 seconds",
            ),
            (
                &["--io-timeout", "3601"],
                "io timeout 3601 s must be from 1 to 3600",
            ),
            (
                &["--io-timeout", MAX],
                "io timeout 18446744073709551615 s must be",
            ),
            (&["--io-timeout", "18446744073709551616"], "--io-timeout"),
            (
                &["--node-down-timeout", "0"],
                "node-down timeout 0 s must be from 1 to 3600",
            ),
            (
                &["--node-down-timeout", MAX],
                "node-down timeout 18446744073709551615 s",
            ),
            (&["--queues", "0"], "queues 0 must be from 1 to 64"),
            (&["--queues", "65"], "queues 65 must be from 1 to 64"),
            (
                &["--queues", MAX],
                "queues 18446744073709551615 must be from 1 to 64",
            ),
            (&["--depth", "0"], "depth 0 must be from 1 to 4096"),
            (&["--depth", "4097"], "depth 4097 must be from 1 to 4096"),
            (&["--depth", MAX], "--depth"),
            (
                &["--block-size", "1024"],
                "block size 1024 must be 512 or 4096",
            ),
            (&["--block-size", "0"], "block size 0 must be 512 or 4096"),
            (&["--block-size", MAX], "--block-size"),
            (
                &["--stripe-unit", "3K"],
                "stripe unit 3072 must be a power of two from 4096 to 4194304",
            ),
            (&["--stripe-unit", "2K"], "stripe unit 2048"),
            (&["--stripe-unit", "8M"], "stripe unit 8388608"),
            (
                &["--stripe-unit", "4G"],
                "stripe unit 4294967296 is too large",
            ),
            (&["--stripe-unit", MAX], "is too large"),
        ],
    );
    refused(
        MAP,
        &[
            (
                &["--size", "0"],
                "volume size 0 must be a non-zero multiple of 512",
            ),
            (&["--size", "1000"], "volume size 1000 must be"),
            (&["--size", MAX], "at most 1152921504606846976"),
            (&["--size", "2000000T"], "at most 1152921504606846976"),
            (&["--size", "99999999999999999999T"], "is too large"),
            (&["--size", "18446744073709551616"], "is too large"),
            (&["--size", "16777216T"], "is too large"),
            (
                &["--size", "1049088", "--block-size", "4096"],
                "volume size 1049088 is not a multiple of the block size 4096",
            ),
        ],
    );
}

#[test]
fn map_refuses_bad_node_lists() {
    let many: Vec<String> = (0..1025)
        .map(|i| format!("127.0.0.1:{}", 1000 + i))
        .collect();
    let many = many.join(",");
    refused(
        &["map", "--volume", "v", "--size", "64M"],
        &[
            (
                &["--nodes", &many],
                "node count 1025 must be from 1 to 1024",
            ),
            (
                &["--nodes", "127.0.0.1:9,127.0.0.1:9"],
                "node 127.0.0.1:9 is listed twice",
            ),
        ],
    );
}

#[test]
fn map_takes_the_bounds_themselves() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk (the VM tests cover map there)");
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    for edge in [
        &[
            "--size",
            "1M",
            "--io-timeout",
            "1",
            "--node-down-timeout",
            "3600",
        ][..],
        &[
            "--size",
            "1024T",
            "--io-timeout",
            "3600",
            "--node-down-timeout",
            "1",
            "--queues",
            "64",
            "--depth",
            "4096",
            "--block-size",
            "4096",
            "--stripe-unit",
            "4M",
        ],
        &[
            "--size",
            "512",
            "--queues",
            "1",
            "--depth",
            "1",
            "--stripe-unit",
            "4K",
        ],
    ] {
        let mut args = MAP.to_vec();
        args.extend(edge);
        let out = netblk(state.path(), &args);
        // Past every check: it fails only for want of the ublk driver.
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("modprobe ublk_drv"), "{args:?}: {stderr}");
    }
}

fn record(id: u32, io_timeout: &str) -> String {
    format!(
        "netblk-device 2\nid {id}\nvolume v\nsize 67108864\nstripe_unit 65536\n\
         nodes 127.0.0.1:7001,127.0.0.1:7002\nqueues 1\ndepth 64\nblock_size 512\n\
         data_path copy\npid 4194305\npid_start 0\nclient_id netblk-1-ab\ngeneration 0\n\
         io_timeout {io_timeout}\nnode_down_timeout 15\nsend zc\nvolume_ids \n"
    )
}

#[test]
fn map_recover_checks_the_numbers_given_and_those_recorded() {
    refused(
        &["map", "--recover", "7"],
        &[
            (
                &["--io-timeout", "0"],
                "io timeout 0 s must be from 1 to 3600",
            ),
            (&["--queues", "0"], "queues 0 must be from 1 to 64"),
            (&["--depth", "5000"], "depth 5000 must be from 1 to 4096"),
        ],
    );
    let state = tempfile::tempdir().expect("tempdir");
    // A pid above the kernel's pid_max: its daemon is surely dead.
    std::fs::write(state.path().join("ublk7"), record(7, MAX)).expect("record");
    let out = netblk(state.path(), &["map", "--recover", "7"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the record of /dev/ublkb7")
            && stderr.contains("io timeout 18446744073709551615 s must be from 1 to 3600"),
        "{stderr}"
    );
}

#[test]
fn bench_refuses_numbers_out_of_range() {
    refused(
        &["bench"],
        &[
            (
                &["--duration", "0"],
                "duration 0 s must be from 0.001 to 3600 seconds",
            ),
            (
                &["--duration", "NaN"],
                "duration NaN s must be from 0.001 to 3600",
            ),
            (
                &["--duration", "inf"],
                "duration inf s must be from 0.001 to 3600",
            ),
            (
                &["--duration", "1e300"],
                "must be from 0.001 to 3600 seconds",
            ),
            (&["--duration", "3601"], "duration 3601 s must be"),
            (&["--duration=-1"], "duration -1 s must be"),
            (&["--node-count", "0"], "node count 0 must be from 1 to 64"),
            (
                &["--node-count", "65"],
                "node count 65 must be from 1 to 64",
            ),
            (
                &["--node-count", MAX],
                "node count 18446744073709551615 must be from 1 to 64",
            ),
            (&["--queues", "0"], "queues 0 must be from 1 to 64"),
            (&["--queues", MAX], "must be from 1 to 64"),
            (&["--depth", "0"], "depth 0 must be from 1 to 4096"),
            (&["--depth", "4097"], "depth 4097 must be from 1 to 4096"),
            (
                &["--depth", "2", "--queues", "4"],
                "at least the number of queues 4",
            ),
            (
                &["--size", "512K"],
                "volume size 524288 must be at least 1048576 bytes",
            ),
            (&["--size", MAX], "at most 1152921504606846976"),
            (&["--size", "99999999999999999999T"], "is too large"),
            (
                &["--stripe-unit", "3K"],
                "stripe unit 3072 must be a power of two",
            ),
            (
                &["--nodes", "127.0.0.1:9,127.0.0.1:9"],
                "node 127.0.0.1:9 is listed twice",
            ),
        ],
    );
}

#[test]
fn demo_refuses_sizes_out_of_range() {
    refused(
        &["demo"],
        &[
            (
                &["--size", "0"],
                "volume size 0 must be a non-zero multiple of 512",
            ),
            (&["--size", "1000"], "volume size 1000"),
            (&["--size", MAX], "at most 1152921504606846976"),
            (&["--size", "99999999999999999999T"], "is too large"),
        ],
    );
}

#[test]
fn list_names_bad_records_and_still_shows_the_good_ones() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = state.path();
    std::fs::write(dir.join("ublk3"), record(3, "30")).expect("record");
    let torn = record(4, "30");
    std::fs::write(dir.join("ublk4"), &torn[..torn.len() - 3]).expect("torn");
    std::fs::write(dir.join("ublk5"), [0u8, 159, 146, 150]).expect("garbage");
    std::fs::write(dir.join("ublk6"), "x".repeat(100 << 10)).expect("oversized");
    std::os::unix::fs::symlink(dir.join("ublk3"), dir.join("ublk8")).expect("symlink");
    std::fs::write(dir.join("ublk9"), record(9, "30")).expect("record");
    let out = netblk(dir, &["list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let rows: Vec<&str> = stdout.lines().collect();
    assert_eq!(rows.len(), 3, "header and the two good devices: {stdout}");
    assert!(
        rows[1].starts_with("3 ") && rows[1].contains("/dev/ublkb3"),
        "{stdout}"
    );
    assert!(
        rows[2].starts_with("9 ") && rows[2].contains("/dev/ublkb9"),
        "{stdout}"
    );
    for (file, why) in [
        ("ublk4", "cut short"),
        ("ublk5", "not a text file"),
        ("ublk6", "larger than any record"),
        ("ublk8", "symbolic link"),
    ] {
        let named = format!("{}: ", dir.join(file).display());
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&named) && l.contains(why)),
            "{file}: {why}: {stderr}"
        );
    }
    assert!(stderr.contains("4 device record(s)"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_symlinked_state_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::write(real.join("ublk3"), record(3, "30")).expect("record");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let out = netblk(&link, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "state directory {} is a symbolic link",
            link.display()
        )),
        "{stderr}"
    );
    let out = netblk(&link, &["map", "--recover", "3"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
}

#[test]
fn the_queue_failure_test_hook_is_checked_before_anything_starts() {
    let state = tempfile::tempdir().expect("tempdir");
    for (hook, queues, says) in [
        (
            "x",
            "1",
            "NETBLK_TEST_FAIL_QUEUE: 'x' is not <queue>:<millis>",
        ),
        ("1:-1", "2", "'1:-1' is not <queue>:<millis>"),
        (
            "0:3600001",
            "1",
            "delay 3600001 ms must be at most 3600000 ms",
        ),
        (
            "2:100",
            "2",
            "NETBLK_TEST_FAIL_QUEUE: queue 2 does not exist: the device has 2 queue(s)",
        ),
    ] {
        let mut args = MAP.to_vec();
        args.extend(["--size", "64M", "--queues", queues]);
        let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
            .args(&args)
            .env("NETBLK_STATE_DIR", state.path())
            .env("NETBLK_TEST_FAIL_QUEUE", hook)
            .output()
            .expect("run netblk");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{hook}: {stderr}");
        assert!(
            stderr.contains(says),
            "{hook}: expected {says:?} in {stderr}"
        );
    }
    assert_eq!(std::fs::read_dir(state.path()).expect("state").count(), 0);
}

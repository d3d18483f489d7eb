//! `netblk bench` end to end, briefly: it starts mock nodes, measures every
//! workload in both send modes, each with its wire baseline, and prints one JSON
//! object.

use std::process::Command;

#[test]
fn bench_runs_every_workload_and_prints_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args([
            "bench",
            "--duration",
            "0.3",
            "--node-count",
            "2",
            "--size",
            "64M",
            "--json",
        ])
        .output()
        .expect("run netblk bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netblk bench failed:\n{stderr}");
    let json = stdout.trim();
    assert!(
        json.starts_with('{') && json.ends_with('}'),
        "one JSON object: {json}"
    );
    assert_eq!(json.lines().count(), 1);
    for workload in ["seqwrite-1m", "seqread-1m", "randwrite-4k", "randread-4k"] {
        for mode in ["zc", "copy"] {
            let key = format!("\"workload\":\"{workload}\",\"mode\":\"{mode}\"");
            assert!(json.contains(&key), "{key} missing from {json}");
        }
    }
    assert_eq!(
        json.matches("\"baseline\":\"wire\"").count(),
        8,
        "every workload has its wire baseline: {json}"
    );
    assert!(json.contains("\"p999_us\":"), "{json}");
    assert!(
        !json.contains("\"ops\":0,"),
        "every workload did some IO: {json}"
    );
    assert_eq!(json.matches("\"ratio\":").count(), 8);
}

#[test]
fn bench_security_measures_digests_against_plaintext() {
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args([
            "bench",
            "--security",
            "--duration",
            "0.3",
            "--rounds",
            "1",
            "--node-count",
            "2",
            "--size",
            "64M",
            "--workloads",
            "randwrite-4k,seqread-1m",
            "--json",
        ])
        .output()
        .expect("run netblk bench --security");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "netblk bench --security failed:\n{stderr}"
    );
    let json = String::from_utf8_lossy(&out.stdout);
    for workload in ["randwrite-4k", "seqread-1m"] {
        let key = format!("\"workload\":\"{workload}\",\"mode\":\"copy\",\"rounds\":1");
        assert!(json.contains(&key), "{key} missing from {json}");
    }
    assert_eq!(
        json.matches("\"vs_plaintext\":{\"ratio\":").count(),
        2,
        "{json}"
    );
    assert_eq!(
        json.matches("\"tls\":null").count(),
        2,
        "no TLS without --tls-dir: {json}"
    );
    assert!(
        !json.contains("\"ops\":0,"),
        "every run did some IO: {json}"
    );
    // Its own nodes only, and --tls-dir only with --security.
    for args in [
        &["bench", "--security", "--nodes", "127.0.0.1:1"][..],
        &["bench", "--tls-dir", "/tmp"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
    }
}

#[test]
fn bench_rejects_bad_arguments_clearly() {
    for args in [
        &["bench", "--duration", "-1"][..],
        &["bench", "--mode", "fast"],
        &["bench", "--stripe-unit", "3x"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.is_empty() && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn map_without_the_ublk_driver_says_what_to_do_and_list_still_works() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this kernel has ublk (the VM tests cover map there)");
        return;
    }
    let state = std::env::temp_dir().join(format!("netblk-cli-state-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args([
            "map",
            "--volume",
            "v",
            "--size",
            "64M",
            "--nodes",
            "127.0.0.1:9",
        ])
        .env("NETBLK_STATE_DIR", &state)
        .output()
        .expect("run netblk map");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("modprobe ublk_drv"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .arg("list")
        .env("NETBLK_STATE_DIR", &state)
        .output()
        .expect("run netblk list");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ID "));
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args(["unmap", "/dev/sda"])
        .output()
        .expect("run netblk unmap");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a netblk device"));
}

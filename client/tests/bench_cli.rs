//! `netblk bench` end to end, briefly: it starts mock nodes, measures every
//! workload in both send modes and both baselines, and prints one JSON object.

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
    assert!(
        json.contains("\"echo\":{") && json.contains("\"bulk\":{"),
        "baselines: {json}"
    );
    assert!(
        !json.contains("\"ops\":0,"),
        "every workload did some IO: {json}"
    );
    assert_eq!(json.matches("\"ratio\":").count(), 8);
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

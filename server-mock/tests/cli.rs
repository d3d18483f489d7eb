//! The command line of `netblk-mock-node`. Being an integration test of this
//! package, it also makes `cargo test --workspace` build the binary that the
//! mock-cluster tests in `tests/` start.

fn mock_node_bin() -> &'static str {
    env!("CARGO_BIN_EXE_netblk-mock-node")
}

#[test]
fn help_explains_every_flag() {
    let out = std::process::Command::new(mock_node_bin())
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--store",
        "--max-io-size",
        "--node-id",
        "--drain-timeout",
        "--handshake-timeout",
        "--admin-listen",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--latency-us",
        "--jitter-us",
        "--error-probability",
        "--error-status",
        "--drop-after",
        "--stall",
        "--corrupt-replies",
        "--corrupt-part",
        "--crash-after",
        "--fault-seed",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}");
    }
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    for args in [
        &["--error-probability", "1.5"][..],
        &["--store", "disk"],
        &["--max-io-size", "12Q"],
        &["--error-status", "ebadf"],
        &["--corrupt-part", "trailer"],
    ] {
        let out = std::process::Command::new(mock_node_bin())
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
fn numbers_out_of_range_are_refused_not_panicked_on() {
    let max = u64::MAX.to_string();
    for (args, says) in [
        (&["--drain-timeout", max.as_str()][..], "0..=3600"),
        (&["--drain-timeout", "3601"], "0..=3600"),
        (&["--handshake-timeout", "0"], "1..=3600"),
        (&["--handshake-timeout", max.as_str()], "1..=3600"),
        (&["--latency-us", max.as_str()], "latency and jitter"),
        (&["--jitter-us", max.as_str()], "latency and jitter"),
        (&["--max-io-size", max.as_str()], "max IO size"),
        (&["--max-io-size", "99999999999999999999T"], "too large"),
        (&["--corrupt-replies", max.as_str()], "--corrupt-replies"),
    ] {
        let out = std::process::Command::new(mock_node_bin())
            .args(args)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(says) && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
}

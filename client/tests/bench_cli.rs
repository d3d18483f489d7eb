//! `netblk bench` end to end, briefly: it starts mock nodes, measures every
//! workload in both send modes, each with its wire baseline, and prints one JSON
//! object.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `command` to its end, or fails the test once `limit` has passed
/// (a node that stops serving a connection shows as a bench that never
/// ends: it once did, with a mock node that stopped reading a connection
/// whose replies had piled up). The output is read by threads of its own
/// and never waited for past the limit: a process the program left behind
/// holding its standard error must not turn a failure into a hang (the
/// mock nodes of a killed bench once did, for the whole CI run).
fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run netblk bench");
    let reader = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().expect("stdout")));
    let err = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err
                .recv_timeout(Duration::from_secs(15))
                .unwrap_or_else(|_| {
                    b"(its standard error is still held open, by the mock nodes it started?)"
                        .to_vec()
                });
            panic!(
                "netblk bench ran past {limit:?}:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let grace = Duration::from_secs(15);
    let bytes = |rx: mpsc::Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(grace).unwrap_or_else(|_| {
            panic!("netblk bench exited, but its {name} stayed open for {grace:?} (mock nodes left behind?)")
        })
    };
    Output {
        status,
        stdout: bytes(out, "standard output"),
        stderr: bytes(err, "standard error"),
    }
}

#[test]
fn bench_runs_every_workload_and_prints_json() {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_netblk")).args([
            "bench",
            "--duration",
            "0.3",
            "--node-count",
            "2",
            "--size",
            "64M",
            "--json",
        ]),
        Duration::from_secs(60),
    );
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
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_netblk")).args([
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
        ]),
        Duration::from_secs(120),
    );
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

/// `--resync`: random writes while a member catches up, against the same
/// writes all in sync; the catch-up copies the whole column the backlog
/// pass wrote, at about its rate, for the whole measured run.
#[test]
fn bench_resync_measures_writes_during_a_catch_up() {
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_netblk")).args([
            "bench",
            "--resync",
            "--replicas",
            "2",
            "--node-count",
            "2",
            "--size",
            "192M",
            "--duration",
            "0.5",
            "--rounds",
            "1",
            "--json",
        ]),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "netblk bench --resync failed:\n{stderr}"
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let key = "\"resync\":[{\"workload\":\"randwrite-4k\",\"rounds\":1,";
    assert!(json.contains(key), "{key} missing from {json}");
    assert!(
        json.contains("\"backlog_bytes\":201326592"),
        "the whole column to copy: {json}"
    );
    let number = |name: &str| -> f64 {
        let at = json.find(&format!("\"{name}\":")).expect(name) + name.len() + 3;
        json[at..]
            .split([',', '}'])
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a number")
    };
    let copied = number("copied_bytes_s");
    let rate = number("rate_bytes_s");
    assert_eq!(rate, f64::from(64u32 << 20), "the default rate");
    assert!(
        copied > rate / 4.0 && copied < rate * 1.5,
        "copied at {copied} B/s, the rate {rate}: {json}"
    );
    assert!(number("ratio") > 0.0, "{json}");
    assert!(
        !json.contains("\"ops\":0,"),
        "every run did some IO: {json}"
    );
    // A catch-up needs replicas.
    let out = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args(["bench", "--resync"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replicas 2 or more"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A bench killed outright takes its mock nodes with it: left running,
/// they held its standard error open, and whoever waited for its output
/// (the test above, in CI) waited for ever.
#[test]
fn a_killed_bench_leaves_no_mock_node_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netblk"))
        .args([
            "bench",
            "--duration",
            "30",
            "--node-count",
            "2",
            "--size",
            "64M",
            "--workloads",
            "randwrite-4k",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run netblk bench");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut told = false;
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
            // The nodes are up once the first measurement starts.
            if !told && String::from_utf8_lossy(&seen).contains("randwrite-4k") {
                told = true;
                let _ = tx.send(false);
            }
        }
        let _ = tx.send(true);
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(60)),
        Ok(false),
        "the bench never started measuring"
    );
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(15)),
        Ok(true),
        "the bench's standard error is still open 15 s after it was killed: its mock nodes outlived it"
    );
}

//! `netblk-node-check` (issue 24): the mock node passes every check with
//! each store (null: the checks that do not need the data kept), and a
//! node that breaks a rule on purpose fails exactly the checks of that rule.

use std::collections::BTreeSet;
use std::process::Command;

use netblk_tests::{MockNode, mock_node_bin, node_check_bin};

/// Runs the kit against `node` with `extra` arguments: (section, check,
/// result) of every check.
fn check(node: &MockNode, extra: &[&str]) -> Vec<(String, String, String)> {
    let mut args = vec![
        node.addr.to_string(),
        "--json".into(),
        "--timeout".into(),
        "2".into(),
    ];
    if let Some(admin) = node.admin_addr {
        args.extend(["--admin".into(), admin.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = Command::new(node_check_bin())
        .args(&args)
        .output()
        .expect("run netblk-node-check");
    let text = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let results: Vec<(String, String, String)> = json["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (field("section"), field("check"), field("result"))
        })
        .collect();
    let failed = results.iter().any(|r| r.2 == "FAIL");
    assert_eq!(
        out.status.code(),
        Some(i32::from(failed)),
        "exit status 1 exactly when a check failed: {text}"
    );
    results
}

fn with(results: &[(String, String, String)], verdict: &str) -> BTreeSet<String> {
    results
        .iter()
        .filter(|r| r.2 == verdict)
        .map(|r| format!("{} {}", r.0, r.1))
        .collect()
}

/// A restart command for a directory-store node at `addr`: kills the
/// process in `pidfile` and starts another on the same store.
fn restart_script(dir: &std::path::Path, node: &MockNode, store: &str, extra: &str) -> String {
    let pidfile = dir.join("pid");
    std::fs::write(&pidfile, node.pid().to_string()).expect("pidfile");
    // The same admin listener: later checks hold requests through it.
    let admin = node
        .admin_addr
        .map_or(String::new(), |a| format!("--admin-listen {a}"));
    format!(
        "kill -9 $(cat {p}); sleep 0.3; {bin} --listen {addr} --store {store} {admin} {extra} >/dev/null 2>&1 & echo $! > {p}; sleep 0.5",
        p = pidfile.display(),
        bin = mock_node_bin().display(),
        addr = node.addr,
    )
}

fn kill_restarted(dir: &std::path::Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("pid"))
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        // SAFETY: kill only sends a signal to the restarted node's process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[test]
fn the_mock_node_passes_every_check_with_each_store() {
    let node = MockNode::start(&["--store", "memory"]);
    let results = check(&node, &[]);
    assert!(
        with(&results, "FAIL").is_empty(),
        "{:?}",
        with(&results, "FAIL")
    );
    assert_eq!(
        with(&results, "SKIP").len(),
        1,
        "only the restart check skips without --restart-cmd: {:?}",
        with(&results, "SKIP")
    );
    assert!(results.len() >= 40, "{} checks", results.len());
    for extra in ["", "--volatile-cache"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = format!("dir:{}", dir.path().join("store").display());
        let mut args = vec!["--store", store.as_str()];
        if !extra.is_empty() {
            args.push(extra);
        }
        let node = MockNode::start(&args);
        let script = restart_script(dir.path(), &node, &store, extra);
        let results = check(&node, &["--restart-cmd", &script]);
        kill_restarted(dir.path());
        assert!(
            with(&results, "FAIL").is_empty() && with(&results, "SKIP").is_empty(),
            "dir store {extra}: failed {:?}, skipped {:?}",
            with(&results, "FAIL"),
            with(&results, "SKIP")
        );
    }
    // A null store keeps nothing: the checks that do not read data back.
    let node = MockNode::start(&["--store", "null"]);
    let results = check(
        &node,
        &["--only", "1,3.1,3.2,3.7,4,5.1,5.2,5.4,5.6,7.2,9,10"],
    );
    assert!(
        with(&results, "FAIL").is_empty(),
        "null store: {:?}",
        with(&results, "FAIL")
    );
    assert!(with(&results, "PASS").len() >= 20, "{results:?}");
}

/// Each deliberately broken node fails the checks of the rule it breaks,
/// and no other.
#[test]
fn a_node_that_breaks_a_rule_fails_exactly_its_checks() {
    let cases: [(&[&str], &[&str]); 34] = [
        (&["--broken", "zero-length-invalid"], &["6.3 a zero-length"]),
        (&["--broken", "fua-unsupported"], &["6.6"]),
        (&["--broken", "flush-unsupported"], &["6.7"]),
        (
            &["--broken", "write-reply-payload"],
            &["3.3 a reply carries"],
        ),
        (&["--broken", "reject-unknown-fields"], &["3.6 unknown"]),
        (&["--broken", "odd-size"], &["4.2"]),
        (&["--broken", "duplicate-reply"], &["6.2"]),
        (&["--broken", "ranges-invalid"], &["6.3 a request beyond"]),
        (&["--broken", "unaligned-writes"], &["6.5"]),
        (&["--broken", "no-missed-regions"], &["10.3"]),
        (&["--broken", "any-name"], &["4.1"]),
        (&["--broken", "default-layout"], &["5.1"]),
        (&["--broken", "no-node-id"], &["5.6"]),
        (
            &["--broken", "any-version"],
            &["1.2 another protocol version"],
        ),
        (&["--broken", "create-when-existing"], &["5.2"]),
        (&["--broken", "ignore-size"], &["5.4", "6.10"]),
        (
            &["--broken", "incarnation-per-connection"],
            &["5.3 an accepted"],
        ),
        (&["--broken", "ping-no-echo"], &["6.9"]),
        (&["--broken", "resize-ignored"], &["6.10"]),
        (&["--broken", "delete-ignored"], &["4.3", "6.11"]),
        (&["--broken", "wrong-digest"], &["6.12"]),
        (&["--broken", "no-read-limit"], &["3.4 a read"]),
        (&["--broken", "accept-bad-digest"], &["5.7"]),
        (&["--broken", "ignore-owner-epoch"], &["8.1"]),
        (
            &["--broken", "accept-any-revision"],
            &["1.2 another revision"],
        ),
        (&["--broken", "ignore-layout"], &["4.4"]),
        (&["--broken", "no-compare-and-set"], &["9.2"]),
        (&["--broken", "accept-bad-records"], &["9.3"]),
        // Missed regions are seeded from the log: without one, both fail.
        (&["--broken", "no-activity-log"], &["10.1", "10.3"]),
        (&["--broken", "discard-keeps-data"], &["6.8"]),
        (
            &["--broken", "describe-no-record"],
            &["13.1 describe states"],
        ),
        (&["--broken", "describe-creates"], &["13.1 describing"]),
        (
            &["--broken", "keep-bad-connections"],
            &["3.1", "3.2", "3.3", "3.4 a write", "3.6 bad", "3.7"],
        ),
        (&["--no-fencing"], &["7.2", "7.3"]),
    ];
    for (args, expected) in cases {
        let node_args: Vec<&str> = ["--store", "memory"].iter().chain(args).copied().collect();
        let node = MockNode::start(&node_args);
        let results = check(&node, &[]);
        let failed = with(&results, "FAIL");
        assert!(!failed.is_empty(), "{args:?}: nothing failed");
        for f in &failed {
            assert!(
                expected.iter().any(|e| f.starts_with(e)),
                "{args:?}: {f} failed too"
            );
        }
        for e in expected {
            assert!(
                failed.iter().any(|f| f.starts_with(e)),
                "{args:?}: no check of {e} failed: {failed:?}"
            );
        }
    }
    // Across a restart (kill -9): the same incarnation, or a flush or a
    // FUA write acknowledged without making the volatile cache's data
    // durable.
    for broken in [
        "--broken same-incarnation",
        "--volatile-cache --broken ack-flush-without-sync",
        "--volatile-cache --broken fua-without-sync",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = format!("dir:{}", dir.path().join("store").display());
        let mut args = vec!["--store", store.as_str()];
        args.extend(broken.split(' '));
        let node = MockNode::start(&args);
        let script = restart_script(dir.path(), &node, &store, broken);
        let results = check(&node, &["--restart-cmd", &script]);
        kill_restarted(dir.path());
        let failed = with(&results, "FAIL");
        assert_eq!(failed.len(), 1, "{broken}: {failed:?}");
        assert!(
            failed.iter().all(|f| f.starts_with("5.3 a restarted")),
            "{broken}: {failed:?}"
        );
    }
}

/// Over mutual TLS (the node asks for a client certificate): every check
/// runs inside TLS and passes; without a client certificate nothing passes
/// and the run says why.
#[test]
fn the_kit_runs_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, node_leaf, client) = netblk_tls::testpki::standard(dir.path()).expect("pki");
    let path = |p: &std::path::Path| p.to_str().expect("path").to_string();
    let node = MockNode::start(&[
        "--store",
        "memory",
        "--tls-cert",
        &path(&node_leaf.cert),
        "--tls-key",
        &path(&node_leaf.key),
        "--tls-client-ca",
        &path(&ca),
    ]);
    let tls = [
        "--tls-ca".to_string(),
        path(&ca),
        "--tls-cert".into(),
        path(&client.cert),
        "--tls-key".into(),
        path(&client.key),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let results = check(&node, &tls);
    assert!(
        with(&results, "FAIL").is_empty(),
        "{:?}",
        with(&results, "FAIL")
    );
    assert!(with(&results, "PASS").len() >= 40, "{results:?}");
    // Plaintext against a TLS node: every check fails, none passes.
    let results = check(&node, &["--only", "6.5,6.9"]);
    assert_eq!(with(&results, "FAIL").len(), 2, "{results:?}");
    assert!(with(&results, "PASS").is_empty(), "{results:?}");
}

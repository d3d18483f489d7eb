//! Pools of nodes from the command line: `netblk pool check` and
//! `netblk pool place` (placement itself is unit-tested in
//! `client/src/placement.rs`).

use std::path::Path;
use std::process::{Command, Output};

use netblk_tests::netblk_bin;

fn netblk(args: &[&str]) -> Output {
    Command::new(netblk_bin())
        .args(args)
        .output()
        .expect("run netblk")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Six nodes in three zones, two per zone.
fn six_in_three_zones(dir: &Path) -> String {
    let mut text = String::new();
    for i in 0..6 {
        text.push_str(&format!(
            "[[node]]\naddress = \"10.0.0.{}:7000\"\nweight = {}\nzone = \"{}\"\n\n",
            i + 1,
            1 + i % 2,
            ["a", "b", "c"][i / 2]
        ));
    }
    let path = dir.join("pool.toml");
    std::fs::write(&path, text).expect("write pool");
    path.display().to_string()
}

#[test]
fn pool_check_shows_a_valid_pool_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = six_in_three_zones(dir.path());
    let out = netblk(&["pool", "check", &pool]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("valid"), "{shown}");
    assert!(shown.contains("6 node(s), total weight 9"), "{shown}");
    assert!(shown.contains("zone  3 domain(s)"), "{shown}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[node]]\naddress = \"10.0.0.1:7000\"\nweight = -1\n").expect("write");
    let out = netblk(&["pool", "check", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("node 1: key `weight`: -1 is not a positive number"),
        "{}",
        text(&out)
    );

    let missing = dir.path().join("none.toml");
    let out = netblk(&["pool", "check", &missing.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot read pool file"),
        "{}",
        text(&out)
    );
}

#[test]
fn pool_place_keeps_replicas_in_distinct_zones_or_says_why_it_cannot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = six_in_three_zones(dir.path());
    let place = |volume: &str, columns: &str, replicas: &str, spread: &str| {
        netblk(&[
            "pool",
            "place",
            &pool,
            "--volume",
            volume,
            "--columns",
            columns,
            "--replicas",
            replicas,
            "--spread",
            spread,
        ])
    };
    let out = place("pvc-1", "3", "2", "zone");
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    for c in 0..3 {
        let line = shown
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("column {c}:")))
            .unwrap_or_else(|| panic!("no column {c}: {shown}"));
        let zones: Vec<&str> = line.matches("(zone ").collect();
        assert_eq!(zones.len(), 2, "{line}");
        let a = line.split("(zone ").nth(1).and_then(|s| s.get(..1));
        let b = line.split("(zone ").nth(2).and_then(|s| s.get(..1));
        assert_ne!(a, b, "replicas of column {c} share a zone: {line}");
    }
    // The same name, the same answer.
    assert_eq!(place("pvc-1", "3", "2", "zone").stdout, out.stdout);
    // Four replicas cannot be in distinct zones among three.
    let out = place("pvc-1", "1", "4", "zone");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("need 4 distinct zones; the pool has 3"),
        "{}",
        text(&out)
    );
    // No node has a rack label.
    let out = place("pvc-1", "1", "2", "rack");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("needs a rack label on every node"),
        "{}",
        text(&out)
    );
    let out = place("pvc-1", "1", "2", "row");
    assert_eq!(out.status.code(), Some(2), "a bad level is a usage error");
}

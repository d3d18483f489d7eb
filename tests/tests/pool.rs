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

/// A pool file of `nodes`, each `(address, zone, weight)`.
fn pool_file(path: &Path, nodes: &[(std::net::SocketAddr, &str, u32)]) -> String {
    let mut text = String::from("# the test's pool\n");
    for (addr, zone, weight) in nodes {
        text.push_str(&format!(
            "[[node]]\naddress = \"{addr}\"\nzone = \"{zone}\"\nweight = {weight}\n\n"
        ));
    }
    std::fs::write(path, text).expect("write pool");
    path.display().to_string()
}

fn asker() -> netblk::inquiry::Asker<'static> {
    netblk::inquiry::Asker {
        tls: None,
        timeout: std::time::Duration::from_secs(5),
    }
}

use netblk_tests::described;

/// The members `netblk create` printed.
fn printed_nodes(out: &Output) -> Vec<std::net::SocketAddr> {
    let shown = String::from_utf8_lossy(&out.stdout);
    let line = shown
        .lines()
        .find_map(|l| l.strip_prefix("nodes: "))
        .unwrap_or_else(|| panic!("no nodes line: {shown}"));
    line.split(',')
        .map(|a| a.parse().expect("address"))
        .collect()
}

/// `netblk create --pool` places a volume on C × R live nodes (replicas in
/// distinct zones), writes the placement into every member's record, and
/// finds it there again after the pool changed (a new, heavy node the hash
/// would now prefer moves nothing); a node in use is not removed, an
/// unused one is; delete empties the members.
#[test]
fn a_volume_created_from_a_pool_is_found_by_its_records_not_by_the_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes: Vec<netblk_tests::MockNode> = (0..6)
        .map(|_| netblk_tests::MockNode::start(&["--store", "memory"]))
        .collect();
    let zones = ["a", "a", "b", "b", "c", "c"];
    let entries: Vec<_> = nodes
        .iter()
        .zip(zones)
        .map(|(n, z)| (n.addr, z, 1))
        .collect();
    let path = dir.path().join("pool.toml");
    let pool = pool_file(&path, &entries);
    let create = |size: &str| {
        netblk(&[
            "create",
            "--pool",
            &pool,
            "--volume",
            "pvc-a",
            "--size",
            size,
            "--columns",
            "2",
            "--replicas",
            "2",
            "--spread",
            "zone",
            "--stripe-unit",
            "64K",
        ])
    };
    let out = create("64M");
    assert!(out.status.success(), "{}", text(&out));
    let members = printed_nodes(&out);
    assert_eq!(members.len(), 4);
    // Replicas of a column (row by row: i and i + 2) in distinct zones.
    let zone_of = |a: &std::net::SocketAddr| entries.iter().find(|e| e.0 == *a).map(|e| e.1);
    for c in 0..2 {
        assert_ne!(
            zone_of(&members[c]),
            zone_of(&members[c + 2]),
            "{members:?}"
        );
    }
    // Every member holds its place and the record naming all of them;
    // the other nodes hold nothing.
    for (i, addr) in members.iter().enumerate() {
        let found = described(*addr, "pvc-a").expect("held");
        let layout = found.layout.expect("layout");
        assert_eq!(
            (layout.node_index, layout.replica_index),
            (i as u32 % 2, i as u32 / 2)
        );
        assert_eq!(found.volume_size, 64 << 20);
        let record = found.record.expect("record");
        assert_eq!(record.generation, 1);
        let named: Vec<String> = members.iter().map(ToString::to_string).collect();
        assert_eq!(record.members, named);
    }
    for n in nodes.iter().filter(|n| !members.contains(&n.addr)) {
        assert!(described(n.addr, "pvc-a").is_none());
    }
    // Again as asked: nothing changes; at another size: refused.
    let again = create("64M");
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("exists already"), "{}", text(&again));
    assert_eq!(printed_nodes(&again), members);
    let other = create("128M");
    assert_eq!(other.status.code(), Some(1), "{}", text(&other));
    assert!(
        text(&other).contains("not what was asked for"),
        "{}",
        text(&other)
    );

    // A heavy seventh node in a fourth zone: the hash now prefers it, the
    // volume stays where its records put it.
    let seventh = netblk_tests::MockNode::start(&["--store", "memory"]);
    let mut grown = entries.clone();
    grown.push((seventh.addr, "d", 1000));
    pool_file(&path, &grown);
    let preview = netblk(&[
        "pool",
        "place",
        &pool,
        "--volume",
        "pvc-a",
        "--columns",
        "2",
        "--replicas",
        "2",
        "--spread",
        "zone",
    ]);
    assert!(
        String::from_utf8_lossy(&preview.stdout).contains(&seventh.addr.to_string()),
        "the heavy node would take a place: {}",
        text(&preview)
    );
    let loaded = netblk::pool::Pool::load(&path).expect("pool");
    let (_, located) = netblk::pooled::volume_ref(&loaded, "pvc-a", &asker(), None)
        .expect("locate")
        .expect("found");
    assert_eq!(located.nodes, members);
    assert_eq!(
        (located.columns, located.replicas, located.stripe_unit),
        (2, 2, 64 << 10)
    );
    let listed = netblk(&["pool", "volumes", &pool]);
    assert!(listed.status.success(), "{}", text(&listed));
    let named: Vec<String> = members.iter().map(ToString::to_string).collect();
    assert!(
        text(&listed).contains(&format!("pvc-a: {}", named.join(","))),
        "{}",
        text(&listed)
    );

    // A member is not removed (the volume is named); the seventh is.
    let out = netblk(&["pool", "remove", &pool, &members[1].to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("1 volume(s) use it: pvc-a"),
        "{}",
        text(&out)
    );
    let out = netblk(&["pool", "remove", &pool, &seventh.addr.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let left = netblk::pool::Pool::load(&path).expect("pool after remove");
    assert_eq!(left.nodes.len(), 6);
    assert!(left.nodes.iter().all(|n| n.address != seventh.addr));
    assert!(
        std::fs::read_to_string(&path)
            .expect("read")
            .starts_with("# the test's pool"),
        "the rest of the file is kept"
    );

    // Delete: gone from every member; then the member can be removed.
    let out = netblk(&["delete", "--pool", &pool, "--volume", "pvc-a"]);
    assert!(out.status.success(), "{}", text(&out));
    for addr in &members {
        assert!(described(*addr, "pvc-a").is_none());
    }
    let out = netblk(&["pool", "remove", &pool, &members[1].to_string()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// With a member down the placement is still read from the others; a node
/// that does not answer is never removed (what it holds is unknown).
#[test]
fn a_down_member_neither_hides_the_placement_nor_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<netblk_tests::MockNode> = (0..4)
        .map(|_| netblk_tests::MockNode::start(&["--store", "memory"]))
        .collect();
    let entries: Vec<_> = nodes
        .iter()
        .zip(["a", "a", "b", "b"])
        .map(|(n, z)| (n.addr, z, 1))
        .collect();
    let path = dir.path().join("pool.toml");
    let pool = pool_file(&path, &entries);
    let out = netblk(&[
        "create",
        "--pool",
        &pool,
        "--volume",
        "db",
        "--size",
        "16M",
        "--replicas",
        "2",
        "--spread",
        "zone",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let members = printed_nodes(&out);
    let down = nodes
        .iter()
        .position(|n| n.addr == members[0])
        .expect("a member");
    nodes[down].terminate();
    let loaded = netblk::pool::Pool::load(&path).expect("pool");
    let (_, located) = netblk::pooled::volume_ref(&loaded, "db", &asker(), None)
        .expect("locate")
        .expect("found");
    assert_eq!(located.nodes, members);
    let out = netblk(&["pool", "remove", &pool, &members[0].to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot tell which volumes use"),
        "{}",
        text(&out)
    );
    // A new volume placed clear of the dead node is made, with a warning
    // that a node did not answer.
    let name = (0..100)
        .map(|i| format!("v{i}"))
        .find(|v| {
            netblk::placement::place(&loaded, v, 1, 1, netblk::pool::Level::Host)
                .is_ok_and(|p| p.nodes().all(|n| loaded.nodes[n].address != members[0]))
        })
        .expect("a name placed elsewhere");
    let out = netblk(&[
        "create", "--pool", &pool, "--volume", &name, "--size", "16M",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("warning: a node of the pool did not answer"),
        "{}",
        text(&out)
    );
    // A pool whose nodes all lack the volume says so.
    let absent = netblk::pooled::volume_ref(&loaded, "nothing", &asker(), None);
    assert!(
        absent.as_ref().is_err_and(|e| e.contains("did not answer")),
        "{absent:?}"
    );
}

/// `map --pool` checks its arguments and finds the volume before it
/// touches ublk: a volume the pool lacks, and --pool with --nodes, are
/// errors that say so.
#[test]
fn map_from_a_pool_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = netblk_tests::MockNode::start(&["--store", "memory"]);
    let path = dir.path().join("pool.toml");
    let pool = pool_file(&path, &[(node.addr, "a", 1)]);
    let out = netblk(&["map", "--pool", &pool, "--volume", "absent"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no volume 'absent' on the nodes of pool"),
        "{}",
        text(&out)
    );
    let out = netblk(&[
        "map",
        "--pool",
        &pool,
        "--volume",
        "v",
        "--nodes",
        "127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // A volume mapped with --nodes (no placement record) is not a pool's.
    let hs = netblk_protocol::pb::Handshake {
        protocol_version: u32::from(netblk_protocol::PROTOCOL_VERSION),
        revision: netblk_protocol::PROTOCOL_REVISION,
        volume: "plain".into(),
        volume_size: 16 << 20,
        layout: Some(netblk_protocol::pb::Layout {
            stripe_unit: 65536,
            node_count: 1,
            node_index: 0,
            replicas: 1,
            replica_index: 0,
        }),
        ..Default::default()
    };
    netblk_tests::NodeClient::open(node.addr, hs);
    let out = netblk(&["map", "--pool", &pool, "--volume", "plain"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("none of them holds a placement record"),
        "{}",
        text(&out)
    );
}

/// Over mutual TLS: `create`, `pool volumes` and `delete` reach TLS nodes
/// with the TLS files, and without them are refused by the nodes.
#[test]
fn pool_commands_reach_tls_nodes_with_the_tls_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, node_leaf, client) = netblk_tls::testpki::standard(dir.path()).expect("pki");
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();
    let (ca, cert, key) = (path(&ca), path(&node_leaf.cert), path(&node_leaf.key));
    let nodes: Vec<netblk_tests::MockNode> = (0..2)
        .map(|_| {
            netblk_tests::MockNode::start(&[
                "--store",
                "memory",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca,
            ])
        })
        .collect();
    let entries: Vec<_> = nodes.iter().map(|n| (n.addr, "a", 1)).collect();
    let pool = pool_file(&dir.path().join("pool.toml"), &entries);
    let tls = [
        "--tls-ca".to_string(),
        ca.clone(),
        "--tls-cert".into(),
        path(&client.cert),
        "--tls-key".into(),
        path(&client.key),
    ];
    let with_tls = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(tls.iter().map(String::as_str));
        netblk(&all)
    };
    let create = [
        "create",
        "--pool",
        &pool,
        "--volume",
        "sec",
        "--size",
        "16M",
        "--columns",
        "2",
    ];
    let plain = netblk(&create);
    assert_eq!(plain.status.code(), Some(1), "{}", text(&plain));
    let out = with_tls(&create);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(printed_nodes(&out).len(), 2);
    let listed = with_tls(&["pool", "volumes", &pool]);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(text(&listed).contains("sec: "), "{}", text(&listed));
    let out = with_tls(&["delete", "--pool", &pool, "--volume", "sec"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("deleted"), "{}", text(&out));
}

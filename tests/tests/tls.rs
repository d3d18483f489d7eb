//! Mutual TLS between the client and mock nodes on the host (userspace
//! TLS: this kernel has no kernel TLS, and the code under test picks the
//! relay then): a striped volume works end to end; every kind of refusal
//! is an error that says why on both sides, before a volume is named; and
//! certificates rotated on disk are used at the next reconnect.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::{Layout, VolumeSpec};
use netblk::net::{self, ClientTls, ConnectError, Identity, Timeouts};
use netblk_tests::MockNode;
use netblk_tls::config::{ClientFiles, Reloading};
use netblk_tls::testpki::{self, Ca, Leaf, Role};

const MIB: u64 = 1 << 20;

struct Pki {
    dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    node: Leaf,
    client: Leaf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, node, client) = testpki::standard(dir.path()).expect("pki");
    Pki {
        dir,
        ca,
        node,
        client,
    }
}

fn tls_node(pki: &Pki, client_ca: &Path) -> MockNode {
    tls_node_at("127.0.0.1:0", pki, client_ca, "memory")
}

fn tls_node_at(listen: &str, pki: &Pki, client_ca: &Path, store: &str) -> MockNode {
    MockNode::start_at(
        listen,
        &[
            "--store",
            store,
            "--tls-cert",
            pki.node.cert.to_str().expect("path"),
            "--tls-key",
            pki.node.key.to_str().expect("path"),
            "--tls-client-ca",
            client_ca.to_str().expect("path"),
        ],
    )
}

fn client_tls(ca: &Path, leaf: &Leaf) -> Arc<ClientTls> {
    Arc::new(
        Reloading::client(ClientFiles {
            ca: ca.to_path_buf(),
            cert: leaf.cert.clone(),
            key: leaf.key.clone(),
            danger_skip_server_name: false,
        })
        .expect("client TLS"),
    )
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(3),
        io: Duration::from_secs(5),
    }
}

/// One handshake to `node` as a fresh client.
fn connect(node: &MockNode, tls: Option<&ClientTls>) -> Result<net::NodeInfo, ConnectError> {
    let layout = Layout::new(MIB, 65536, 1).expect("layout");
    let who = Identity {
        owner_epoch: 0,
        client_id: "tls-test",
        volume: "t",
        session: 1,
        volume_id: None,
        digest: false,
        tls,
    };
    net::connect(node.addr, 0, &layout, &who, timeouts()).map(|(_, info)| info)
}

fn nothing_reached(node: &MockNode) {
    let stats = node.admin().stats();
    assert_eq!(
        (stats.volumes, stats.requests, stats.bytes_written),
        (0, 0, 0),
        "nothing reached a volume"
    );
}

#[test]
fn a_striped_volume_over_mutual_tls_reads_what_it_wrote() {
    let pki = pki();
    let nodes: Vec<MockNode> = (0..3).map(|_| tls_node(&pki, &pki.ca)).collect();
    let spec = VolumeSpec {
        replicas: 1,
        name: "secret".into(),
        size: 32 * MIB,
        stripe_unit: 64 << 10,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    let options = VolumeOptions {
        depth: 16,
        max_io: MIB as u32,
        tls: Some(client_tls(&pki.ca, &pki.client)),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open over TLS");
    assert!(
        volume
            .nodes()
            .iter()
            .all(|n| n.transport != netblk_tls::Transport::Plain),
        "every connection is TLS"
    );
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i * 13 % 251) as u8).collect();
    volume.write_at(&data, 3 * MIB).expect("write");
    volume.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    volume.read_at(&mut back, 3 * MIB).expect("read");
    assert!(back == data, "read back over TLS differs");
    for node in &nodes {
        assert!(
            node.admin().stats().bytes_written > 0,
            "every node took data"
        );
    }
}

#[test]
fn every_refusal_says_why_and_no_volume_is_touched() {
    let pki = pki();
    let node = tls_node(&pki, &pki.ca);

    // A client certificate from another CA.
    let other = Ca::new("other").expect("ca");
    let stranger = other
        .leaf(pki.dir.path(), "stranger", Role::Client, &[], -1, 30)
        .expect("leaf");
    let err = connect(&node, Some(&client_tls(&pki.ca, &stranger))).expect_err("stranger");
    assert!(
        err.to_string()
            .contains("did not accept this client over TLS"),
        "{err}"
    );
    assert!(node.wait_for_log("TLS refused"));

    // The node's certificate checked against another CA.
    other
        .write(&pki.dir.path().join("other-ca.pem"))
        .expect("write");
    let err = connect(
        &node,
        Some(&client_tls(
            &pki.dir.path().join("other-ca.pem"),
            &pki.client,
        )),
    )
    .expect_err("wrong CA");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // An expired client certificate (from the right CA: a new set).
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("expiring").expect("ca");
    ca.write(&dir.path().join("ca.pem")).expect("write");
    let localhost: IpAddr = [127, 0, 0, 1].into();
    let node_leaf = ca
        .leaf(dir.path(), "node", Role::Node, &[localhost], -1, 30)
        .expect("node leaf");
    let expired = ca
        .leaf(dir.path(), "expired", Role::Client, &[], -40, 10)
        .expect("expired");
    let strict = MockNode::start(&[
        "--tls-cert",
        node_leaf.cert.to_str().expect("path"),
        "--tls-key",
        node_leaf.key.to_str().expect("path"),
        "--tls-client-ca",
        dir.path().join("ca.pem").to_str().expect("path"),
    ]);
    let err = connect(
        &strict,
        Some(&client_tls(&dir.path().join("ca.pem"), &expired)),
    )
    .expect_err("expired");
    assert!(err.to_string().contains("over TLS"), "{err}");
    assert!(strict.wait_for_log("expired"), "{}", strict.log());
    nothing_reached(&strict);

    // Plaintext to a TLS node.
    let err = connect(&node, None).expect_err("plaintext to TLS");
    assert!(
        err.to_string()
            .contains("a node with TLS closes a plaintext client"),
        "{err}"
    );
    // TLS to a plaintext node.
    let plain = MockNode::start(&[]);
    let err =
        connect(&plain, Some(&client_tls(&pki.ca, &pki.client))).expect_err("TLS to plaintext");
    assert!(
        err.to_string().contains("does the node serve TLS?"),
        "{err}"
    );
    nothing_reached(&plain);
    nothing_reached(&node);

    // And the right client gets in.
    let info = connect(&node, Some(&client_tls(&pki.ca, &pki.client))).expect("accepted");
    assert_ne!(info.transport, netblk_tls::Transport::Plain);
}

#[test]
fn rotated_certificates_are_used_at_the_next_reconnect() {
    let pki = pki();
    // The node trusts CA 1 through a file we can replace.
    let client_ca = pki.dir.path().join("client-ca.pem");
    std::fs::copy(&pki.ca, &client_ca).expect("copy");
    let store = format!("dir:{}", pki.dir.path().join("store").display());
    let mut node = tls_node_at("127.0.0.1:0", &pki, &client_ca, &store);
    let client_cert = pki.dir.path().join("live-client.pem");
    let client_key = pki.dir.path().join("live-client.key");
    std::fs::copy(&pki.client.cert, &client_cert).expect("copy");
    std::fs::copy(&pki.client.key, &client_key).expect("copy");
    let live = Leaf {
        cert: client_cert.clone(),
        key: client_key.clone(),
    };
    let spec = VolumeSpec {
        replicas: 1,
        name: "rotating".into(),
        size: 8 * MIB,
        stripe_unit: 64 << 10,
        nodes: vec![node.addr],
    };
    let options = VolumeOptions {
        depth: 8,
        max_io: MIB as u32,
        tls: Some(client_tls(&pki.ca, &live)),
        io_timeout: Duration::from_secs(20),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    let data = vec![0x5au8; 64 << 10];
    volume.write_at(&data, 0).expect("write");
    volume.flush().expect("flush");

    // Rotation: the client gets a certificate from CA 2, the node trusts
    // CA 2 instead of CA 1. Nothing is remapped.
    let ca2 = Ca::new("rotated").expect("ca");
    let next = ca2
        .leaf(pki.dir.path(), "next", Role::Client, &[], -1, 30)
        .expect("leaf");
    ca2.write(&client_ca).expect("node trusts CA 2");
    std::fs::copy(&next.cert, &client_cert).expect("rotate cert");
    std::fs::copy(&next.key, &client_key).expect("rotate key");
    // A node restart breaks the connection: the reconnect handshakes with
    // the new files on both sides.
    let addr = node.addr.to_string();
    node.signal(libc::SIGKILL);
    assert!(node.wait_exit(Duration::from_secs(5)).is_some());
    node = tls_node_at(&addr, &pki, &client_ca, &store);
    let mut back = vec![0u8; data.len()];
    volume
        .read_at(&mut back, 0)
        .expect("read after the rotation");
    assert_eq!(back, data);
    assert!(
        node.admin().stats().requests > 0,
        "the rotated client reconnected"
    );
    // The running node reloads its files too: trusting CA 1 again, it
    // turns the CA 2 client away and takes the CA 1 one.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::copy(&pki.ca, &client_ca).expect("node trusts CA 1 again");
    let err = connect(&node, Some(&client_tls(&pki.ca, &next))).expect_err("CA 2 client");
    assert!(err.to_string().contains("over TLS"), "{err}");
    connect(&node, Some(&client_tls(&pki.ca, &pki.client))).expect("CA 1 client");
}

/// Issue 22 over TLS: the membership records go over TLS too (attach and
/// the shrink when a replica dies), and the volume goes on without it.
#[test]
fn a_replicated_volume_over_mutual_tls_survives_a_replica() {
    let pki = pki();
    let nodes: Vec<MockNode> = (0..4).map(|_| tls_node(&pki, &pki.ca)).collect();
    let spec = VolumeSpec {
        replicas: 2,
        name: "secret-r2".into(),
        size: 32 * MIB,
        stripe_unit: 64 << 10,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    let options = VolumeOptions {
        queues: 2,
        depth: 16,
        max_io: MIB as u32,
        replica_timeout: std::time::Duration::from_secs(1),
        tls: Some(client_tls(&pki.ca, &pki.client)),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open over TLS");
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    volume.write_at(&data, 0).expect("write");
    nodes[3].signal(libc::SIGKILL);
    volume
        .write_at(&data, 4 * MIB)
        .expect("write without node 3");
    volume.flush().expect("flush without node 3");
    assert_eq!(volume.membership().view().iss, vec![0b11, 0b01]);
    for offset in [0, 4 * MIB] {
        let mut back = vec![0u8; data.len()];
        volume.read_at(&mut back, offset).expect("read");
        assert!(back == data, "data at {offset}");
    }
}

/// Issue 23 over TLS with data digests, two queues: a replica stopped
/// under writes leaves, is continued, catches up with what it missed (not
/// its whole column) over the same TLS, and a scrub over TLS finds its
/// column equal.
#[test]
fn a_stopped_replica_catches_up_over_tls_with_digests() {
    let pki = pki();
    let nodes: Vec<MockNode> = (0..4).map(|_| tls_node(&pki, &pki.ca)).collect();
    let spec = VolumeSpec {
        replicas: 2,
        name: "secret-back".into(),
        size: 32 * MIB,
        stripe_unit: 64 << 10,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    let tls = client_tls(&pki.ca, &pki.client);
    let options = VolumeOptions {
        queues: 2,
        depth: 16,
        max_io: MIB as u32,
        replica_timeout: Duration::from_secs(1),
        data_digest: true,
        tls: Some(Arc::clone(&tls)),
        resync: netblk::resync::ResyncOptions {
            probe_every: Duration::from_millis(300),
            ..Default::default()
        },
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open over TLS");
    let data = |seed: u64| -> Vec<u8> {
        (0..4 * MIB)
            .map(|i| ((i * 7 + seed * 13) % 251) as u8)
            .collect()
    };
    volume.write_at(&data(1), 0).expect("write");
    nodes[3].signal(libc::SIGSTOP);
    // Column 1's half of 4 MiB, written while node 3 is out.
    volume
        .write_at(&data(2), 16 * MIB)
        .expect("write while node 3 is stopped");
    assert_eq!(volume.membership().view().iss, vec![0b11, 0b01]);
    nodes[3].signal(libc::SIGCONT);
    let m = volume.membership();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while m.view().iss != vec![0b11, 0b11] {
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 not back in sync: {:?}",
            m.view()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let copied = m.resync_bytes.load(std::sync::atomic::Ordering::Relaxed);
    // What it missed, as the remaining member's bitmap holds it: seeded
    // from its activity log (the two 4 MiB regions written since the last
    // trim), not its whole 16 MiB column.
    assert!(
        copied > 0 && copied <= 8 * MIB,
        "a catch-up of what it missed, not its 16 MiB column: {copied} bytes"
    );
    let store = netblk::records::NetRecords {
        addrs: spec.nodes.clone(),
        layout: *volume.layout(),
        volume: spec.name.clone(),
        volume_ids: Arc::clone(&m.pins),
        client_id: "scrub-over-tls".into(),
        tls: Some(tls),
        timeouts: timeouts(),
    };
    let report = netblk::scrub::scrub(&store, volume.layout(), m, false, Duration::from_secs(10))
        .expect("scrub over TLS");
    assert_eq!(report.chunks, 32, "2 columns of 16 MiB in 1 MiB chunks");
    assert!(
        report.mismatches.is_empty() && report.skipped.is_empty(),
        "{report:?}"
    );
    for (offset, seed) in [(0, 1), (16 * MIB, 2)] {
        let mut back = vec![0u8; 4 * MIB as usize];
        volume.read_at(&mut back, offset).expect("read");
        assert!(back == data(seed), "data at {offset}");
    }
}

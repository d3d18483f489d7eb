//! The node part of an online resize (`netblk::resize::Resizer`) against
//! mock nodes: every node takes the new size (handshakes must then present
//! it), and when one cannot follow, the others are put back.

use std::time::Duration;

use netblk::layout::{Layout, LiveSize};
use netblk::net::Timeouts;
use netblk::resize::Resizer;
use netblk_protocol::pb::Status;
use netblk_tests::cluster::Cluster;
use netblk_tests::{NodeClient, handshake};

const MIB: u64 = 1 << 20;

/// Whether node `i` of 3 accepts a handshake for `size`.
fn accepts(cluster: &Cluster, i: usize, size: u64) -> bool {
    let hs = handshake("grow", size, 64 << 10, 3, i as u32);
    NodeClient::handshake_reply(cluster.nodes[i].addr, hs).status == Status::Ok as i32
}

#[test]
fn every_node_takes_the_new_size_or_none_keeps_it() {
    let mut cluster = Cluster::start(3);
    let spec = cluster.spec("grow", 48 * MIB);
    for i in 0..3 {
        assert!(
            accepts(&cluster, i, 48 * MIB),
            "node {i} creates the volume"
        );
    }
    let resizer = Resizer {
        dev_id: 0,
        spec: spec.clone(),
        size: LiveSize::new(48 * MIB),
        client_id: format!("resize-test-{}", std::process::id()),
        volume_ids: Vec::new(),
        timeouts: Timeouts {
            connect: Duration::from_secs(2),
            io: Duration::from_secs(5),
        },
        block_size: 512,
        tls: None,
    };
    let layout = |size| Layout::new(size, 64 << 10, 3).expect("layout");
    resizer
        .tell_nodes(&layout(48 * MIB), 96 * MIB)
        .expect("grow on every node");
    for i in 0..3 {
        assert!(accepts(&cluster, i, 96 * MIB), "node {i} at the new size");
        assert!(
            !accepts(&cluster, i, 48 * MIB),
            "node {i} refuses the old size"
        );
    }
    // Node 2 gone: nodes 0 and 1 grew, then are put back.
    cluster.nodes[2].signal(libc::SIGKILL);
    cluster.nodes[2].wait_exit(Duration::from_secs(5));
    let err = resizer
        .tell_nodes(&layout(96 * MIB), 144 * MIB)
        .expect_err("a node is down");
    assert!(err.starts_with("node 2 ("), "{err}");
    for i in 0..2 {
        assert!(accepts(&cluster, i, 96 * MIB), "node {i} put back");
        assert!(!accepts(&cluster, i, 144 * MIB), "node {i} not left grown");
    }
}

//! The node part of an online resize (`netblk::resize::Resizer`) against
//! mock nodes: every node takes the new size (handshakes must then present
//! it), and when one cannot follow (or the kernel refuses), the others are
//! put back to the size each had before, never below it.

use std::time::Duration;

use netblk::layout::LiveSize;
use netblk::manage::VolumeRef;
use netblk::net::Timeouts;
use netblk::resize::Resizer;
use netblk_protocol::pb::{self, Status};
use netblk_tests::cluster::Cluster;
use netblk_tests::{NodeClient, handshake};

const MIB: u64 = 1 << 20;

/// Whether node `i` of 3 accepts a handshake for `size`.
fn accepts(cluster: &Cluster, i: usize, size: u64) -> bool {
    let hs = handshake("grow", size, 64 << 10, 3, i as u32);
    NodeClient::handshake_reply(cluster.nodes[i].addr, hs).status == Status::Ok as i32
}

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    io: Duration::from_secs(5),
};

/// The volume created at `size` on every node, and a resizer of a device
/// mapped at that size (pinned to the nodes' volume identities).
fn mapped(cluster: &Cluster, size: u64) -> Resizer {
    let volume_ids = (0..3)
        .map(|i| {
            let hs = handshake("grow", size, 64 << 10, 3, i as u32);
            let reply = NodeClient::handshake_reply(cluster.nodes[i].addr, hs);
            assert_eq!(
                reply.status,
                Status::Ok as i32,
                "node {i} creates the volume"
            );
            reply.volume_id
        })
        .collect();
    Resizer {
        dev_id: 0,
        spec: cluster.spec("grow", size),
        size: LiveSize::new(size),
        client_id: format!("resize-test-{}", std::process::id()),
        volume_ids,
        timeouts: TIMEOUTS,
        block_size: 512,
        tls: None,
    }
}

/// Node `i` set to `size` by someone else (a manager's grow cut short).
fn resize_one(cluster: &Cluster, i: usize, size: u64) {
    let hs = pb::Handshake {
        existing: true,
        volume_size: 0,
        ..handshake("grow", 0, 64 << 10, 3, i as u32)
    };
    let mut client = NodeClient::open(cluster.nodes[i].addr, hs);
    let op = pb::request::Op::Resize(pb::Resize { volume_size: size });
    assert_eq!(
        client.status_of(op, &[]),
        Status::Ok as i32,
        "node {i} resized"
    );
}

#[test]
fn every_node_takes_the_new_size_or_none_keeps_it() {
    let mut cluster = Cluster::start(3);
    let resizer = mapped(&cluster, 48 * MIB);
    resizer
        .change(96 * MIB, |_| Ok(()))
        .expect("grow on every node");
    assert_eq!(resizer.size.get(), 96 * MIB);
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
        .change(144 * MIB, |_| Ok(()))
        .expect_err("a node is down");
    assert!(err.contains("node 2 ("), "{err}");
    assert_eq!(resizer.size.get(), 96 * MIB, "the queues keep the old size");
    for i in 0..2 {
        assert!(accepts(&cluster, i, 96 * MIB), "node {i} put back");
        assert!(!accepts(&cluster, i, 144 * MIB), "node {i} not left grown");
    }
}

#[test]
fn undoing_a_grow_puts_each_node_back_to_its_own_size() {
    // A manager's grow (ControllerExpandVolume) got node 0 to 96 MiB, then
    // stopped; the device, at 48 MiB, grows to 144 MiB and node 2 is down.
    let mut cluster = Cluster::start(3);
    let resizer = mapped(&cluster, 48 * MIB);
    resize_one(&cluster, 0, 96 * MIB);
    cluster.nodes[2].signal(libc::SIGKILL);
    cluster.nodes[2].wait_exit(Duration::from_secs(5));
    let err = resizer
        .change(144 * MIB, |_| Ok(()))
        .expect_err("a node is down");
    assert!(err.contains("node 2 ("), "{err}");
    assert!(
        accepts(&cluster, 0, 96 * MIB),
        "node 0 back at 96 MiB, not below"
    );
    assert!(accepts(&cluster, 1, 48 * MIB), "node 1 back at 48 MiB");
}

#[test]
fn a_kernel_refusal_never_shrinks_nodes_a_manager_grew() {
    // ControllerExpandVolume grew every node to 96 MiB; the device follows
    // (48 -> 96 MiB), and the kernel refuses the new size.
    let cluster = Cluster::start(3);
    let resizer = mapped(&cluster, 48 * MIB);
    let volume = VolumeRef {
        replicas: 1,
        name: "grow".into(),
        stripe_unit: 64 << 10,
        nodes: cluster.addrs(),
        tls: None,
    };
    assert_eq!(
        volume.grow(96 * MIB, "resize-test-manager", TIMEOUTS),
        Ok(96 * MIB)
    );
    let mut asked = Vec::new();
    let err = resizer
        .change(96 * MIB, |size| {
            asked.push(size);
            Err("refused".into())
        })
        .expect_err("the kernel refused");
    assert!(err.contains("refused"), "{err}");
    assert_eq!(asked, [96 * MIB]);
    assert_eq!(resizer.size.get(), 48 * MIB, "the queues keep the old size");
    for i in 0..3 {
        assert!(accepts(&cluster, i, 96 * MIB), "node {i} still at 96 MiB");
    }
}

/// A replicated device resizes too: each node is reached with the volume's
/// replicated layout (2 columns × 2 copies over 4 nodes), not as a column
/// of an unreplicated volume of 4 (the node refused that as another
/// layout: NodeExpandVolume of a replicated CSI volume failed).
#[test]
fn a_replicated_volume_resizes_on_every_copy() {
    let cluster = Cluster::start(4);
    let spec = netblk::layout::VolumeSpec {
        replicas: 2,
        ..cluster.spec("rgrow", 32 * MIB)
    };
    let volume = VolumeRef {
        name: spec.name.clone(),
        stripe_unit: spec.stripe_unit,
        nodes: spec.nodes.clone(),
        replicas: 2,
        tls: None,
    };
    let made = volume
        .create(32 * MIB, "resize-test", TIMEOUTS)
        .expect("create the replicated volume");
    let resizer = Resizer {
        dev_id: 0,
        spec,
        size: LiveSize::new(32 * MIB),
        client_id: format!("resize-test-{}", std::process::id()),
        volume_ids: made.into_iter().map(|i| i.volume_id).collect(),
        timeouts: TIMEOUTS,
        block_size: 512,
        tls: None,
    };
    resizer
        .change(64 * MIB, |_| Ok(()))
        .expect("grow every copy");
    assert_eq!(
        volume.lookup("resize-test", TIMEOUTS).expect("lookup"),
        Some(64 * MIB),
        "every node holds the new size"
    );
}

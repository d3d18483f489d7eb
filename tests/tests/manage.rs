//! Volumes managed as a whole (`netblk::manage::VolumeRef`), as the CSI
//! controller will: lookup, create, delete on every node, idempotent.

use std::time::Duration;

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::VolumeSpec;
use netblk::manage::VolumeRef;
use netblk::net::Timeouts;
use netblk_protocol::pb::{self, Status, request::Op};
use netblk_tests::cluster::Cluster;
use netblk_tests::{NodeClient, handshake};

const MIB: u64 = 1 << 20;

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        io: Duration::from_secs(5),
    }
}

#[test]
fn a_volume_is_looked_up_created_and_deleted_on_every_node() {
    let cluster = Cluster::start(3);
    let volume = VolumeRef {
        replicas: 1,
        name: "pvc-1234".into(),
        stripe_unit: 64 << 10,
        nodes: cluster.addrs(),
        tls: None,
    };
    let id = "manage-test";
    assert_eq!(
        volume.lookup(id, timeouts()),
        Ok(None),
        "absent: nothing created"
    );
    assert_eq!(
        volume.lookup(id, timeouts()),
        Ok(None),
        "still absent after a lookup"
    );

    let infos = volume.create(96 * MIB, id, timeouts()).expect("create");
    assert_eq!(infos.len(), 3);
    assert!(infos.iter().all(|i| i.volume_size == 96 * MIB));
    assert_eq!(volume.lookup(id, timeouts()), Ok(Some(96 * MIB)));
    let again = volume
        .create(96 * MIB, id, timeouts())
        .expect("create again");
    assert_eq!(
        again.iter().map(|i| &i.volume_id).collect::<Vec<_>>(),
        infos.iter().map(|i| &i.volume_id).collect::<Vec<_>>(),
        "the same volume, not a new one"
    );
    let other = volume
        .create(48 * MIB, id, timeouts())
        .expect_err("another size");
    assert!(other.to_string().contains("refused"), "{other}");

    volume.delete(id, timeouts()).expect("delete");
    assert_eq!(
        volume.lookup(id, timeouts()),
        Ok(None),
        "deleted everywhere"
    );
    volume
        .delete(id, timeouts())
        .expect("deleting twice is no error");

    // On some nodes only: neither present nor absent.
    volume.create(96 * MIB, id, timeouts()).expect("create");
    let mut node1 = NodeClient::open(
        cluster.nodes[1].addr,
        pb::Handshake {
            existing: true,
            ..handshake("pvc-1234", 0, 64 << 10, 3, 1)
        },
    );
    assert_eq!(
        node1.status_of(Op::Delete(pb::Delete {}), &[]),
        Status::Ok as i32
    );
    let partial = volume.lookup(id, timeouts()).expect_err("partly there");
    assert!(partial.contains("not on nodes [1]"), "{partial}");
    // A delete still clears what is there.
    volume.delete(id, timeouts()).expect("delete what is left");
    assert_eq!(volume.lookup(id, timeouts()), Ok(None));
}

/// What ControllerExpandVolume does while a host has the volume mapped:
/// the nodes grow, the mapped volume keeps working at its old size, and its
/// reconnects (which present the old size, pinned to the volume's identity)
/// are still accepted; a new, unpinned client at the old size is not.
#[test]
fn a_grow_on_the_nodes_leaves_a_mapped_volume_working_across_reconnects() {
    let mut cluster = Cluster::start(3);
    let volume = VolumeRef {
        replicas: 1,
        name: "pvc-grow".into(),
        stripe_unit: 64 << 10,
        nodes: cluster.addrs(),
        tls: None,
    };
    let id = "manage-grow";
    let spec = VolumeSpec {
        replicas: 1,
        name: volume.name.clone(),
        size: 48 * MIB,
        stripe_unit: volume.stripe_unit,
        nodes: volume.nodes.clone(),
    };
    let options = VolumeOptions {
        depth: 8,
        max_io: MIB as u32,
        ..VolumeOptions::default()
    };
    let mapped = Volume::open(&spec, &options).expect("map at 48 MiB");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    mapped
        .write_at(&data, 40 * MIB)
        .expect("write near the end");
    mapped.flush().expect("flush");

    assert_eq!(volume.grow(96 * MIB, id, timeouts()), Ok(96 * MIB));
    assert_eq!(volume.lookup(id, timeouts()), Ok(Some(96 * MIB)));
    assert_eq!(
        volume.grow(96 * MIB, id, timeouts()),
        Ok(96 * MIB),
        "growing again is no change"
    );
    assert_eq!(
        volume.grow(64 * MIB, id, timeouts()),
        Ok(96 * MIB),
        "a grow never shrinks"
    );
    assert!(
        volume.grow(96 * MIB + 1, id, timeouts()).is_err(),
        "a size the layout cannot hold"
    );

    // Every node restarted on its store: the mapped volume reconnects to
    // each at its old size, pinned to the volume's identity.
    for i in 0..3 {
        cluster.nodes[i].signal(libc::SIGKILL);
        assert!(cluster.nodes[i].wait_exit(Duration::from_secs(5)).is_some());
        cluster.restart(i, &[]);
    }
    let mut back = vec![0u8; data.len()];
    mapped
        .read_at(&mut back, 40 * MIB)
        .expect("read across reconnects");
    assert!(back == data, "data after the grow and the reconnects");
    mapped
        .write_at(&data, 0)
        .expect("write after the reconnects");
    mapped
        .read_at(&mut back, 0)
        .expect("read after the reconnects");
    assert!(back == data);
    assert!(
        cluster.nodes.iter().all(|n| n.admin().stats().requests > 0),
        "the volume reconnected to every restarted node and did IO there"
    );
    assert_eq!(
        mapped.size(),
        48 * MIB,
        "the mapped volume stays at its size until it follows"
    );

    match Volume::open(&spec, &options) {
        Ok(_) => panic!("a new map at the old size was accepted"),
        Err(fresh) => assert!(fresh.to_string().contains("refused"), "{fresh}"),
    }
}

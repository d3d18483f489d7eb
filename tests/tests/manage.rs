//! Volumes managed as a whole (`netblk::manage::VolumeRef`), as the CSI
//! controller will: lookup, create, delete on every node, idempotent.

use std::time::Duration;

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
        name: "pvc-1234".into(),
        stripe_unit: 64 << 10,
        nodes: cluster.addrs(),
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

//! A client is who its certificate says, and may touch only what the
//! node's policy gives it (issue 21, point 6): mock nodes over mutual TLS
//! with two client certificates from one CA, "owner" and "hostile"; the
//! node's `--policy`; the bound on a session's step.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use netblk::frontend::{Volume, VolumeOptions};
use netblk::layout::{Layout, VolumeSpec};
use netblk::manage::VolumeRef;
use netblk::net::{self, ClientTls, Identity, Open, Timeouts};
use netblk_protocol::pb::{self, request::Op};
use netblk_tests::{MockNode, NodeClient, handshake};
use netblk_tls::config::{ClientFiles, Reloading};
use netblk_tls::testpki::{Ca, Leaf, Role};

const MIB: u64 = 1 << 20;

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    node: Leaf,
    owner: Leaf,
    hostile: Leaf,
}

/// A CA, a node certificate for 127.0.0.1, and two client certificates
/// whose identities (their common names) are "owner" and "hostile".
fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("netblk identity test CA").expect("ca");
    let ca_path = dir.path().join("ca.pem");
    ca.write(&ca_path).expect("write CA");
    let localhost: IpAddr = [127, 0, 0, 1].into();
    let leaf =
        |name, role, ips: &[IpAddr]| ca.leaf(dir.path(), name, role, ips, -1, 30).expect("leaf");
    let node = leaf("node", Role::Node, &[localhost]);
    let owner = leaf("owner", Role::Client, &[]);
    let hostile = leaf("hostile", Role::Client, &[]);
    Pki {
        ca: ca_path,
        node,
        owner,
        hostile,
        dir,
    }
}

/// A TLS node with a memory store and these extra arguments.
fn tls_node(pki: &Pki, extra: &[&str]) -> MockNode {
    let mut args = vec![
        "--tls-cert",
        pki.node.cert.to_str().expect("path"),
        "--tls-key",
        pki.node.key.to_str().expect("path"),
        "--tls-client-ca",
        pki.ca.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    MockNode::start(&args)
}

fn tls(pki: &Pki, leaf: &Leaf) -> Arc<ClientTls> {
    Arc::new(
        Reloading::client(ClientFiles {
            ca: pki.ca.clone(),
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

fn volume_ref(name: &str, node: &MockNode, tls: Arc<ClientTls>) -> VolumeRef {
    VolumeRef {
        replicas: 1,
        name: name.into(),
        stripe_unit: 64 << 10,
        nodes: vec![node.addr],
        tls: Some(tls),
    }
}

#[test]
fn another_certificate_with_the_victims_client_id_cannot_lock_it_out() {
    let pki = pki();
    let node = tls_node(&pki, &[]);
    let spec = VolumeSpec {
        replicas: 1,
        name: "victim".into(),
        size: 8 * MIB,
        stripe_unit: 64 << 10,
        nodes: vec![node.addr],
    };
    let options = VolumeOptions {
        depth: 8,
        max_io: MIB as u32,
        client_id: "victim-device".into(),
        io_timeout: Duration::from_secs(4),
        node_down_timeout: Duration::from_secs(4),
        tls: Some(tls(&pki, &pki.owner)),
        ..VolumeOptions::default()
    };
    let volume = Volume::open(&spec, &options).expect("open");
    let block = vec![0x11u8; 4096];
    volume.write_at(&block, 0).expect("write");

    // The hostile client presents the victim's client id with the last
    // session there is: under its own identity, it touches nothing of the
    // victim's (it is a client of its own, at a session of its own).
    let layout = Layout::new(spec.size, spec.stripe_unit, 1).expect("layout");
    let hostile_tls = tls(&pki, &pki.hostile);
    let who = Identity {
        owner_epoch: 0,
        client_id: "victim-device",
        volume: "victim",
        session: u64::MAX,
        volume_id: None,
        digest: false,
        tls: Some(&hostile_tls),
    };
    let (_hostile, _) =
        net::connect_as(node.addr, 0, &layout, &who, timeouts(), Open::CreateOrOpen)
            .expect("the hostile client's own session");

    // The victim's connection was not fenced, and its reconnects are not
    // refused as stale: every connection of the node drops on its second
    // request for a while, so the victim reconnects again and again.
    let mut admin = node.admin();
    admin.set_faults(pb::Faults {
        drop_after: 1,
        ..Default::default()
    });
    for i in 1..4u64 {
        volume
            .write_at(&vec![i as u8; 4096], i * 4096)
            .expect("write across reconnects");
    }
    admin.set_faults(pb::Faults::default());
    assert!(
        admin.stats().dropped_connections >= 1,
        "the victim reconnected"
    );
    let mut back = vec![0u8; 4096];
    volume.read_at(&mut back, 3 * 4096).expect("read");
    assert_eq!(back, vec![3u8; 4096]);
    volume.read_at(&mut back, 0).expect("read");
    assert_eq!(back, block);
}

#[test]
fn the_policy_keeps_a_client_to_its_volumes_and_says_who_was_refused_what() {
    let pki = pki();
    let policy = pki.dir.path().join("policy");
    std::fs::write(
        &policy,
        "# who     volumes   what\n\
         owner     owned-*   all\n\
         hostile   owned-1   open     # may use it, not resize or delete it\n",
    )
    .expect("policy");
    let node = tls_node(&pki, &["--policy", policy.to_str().expect("path")]);
    let owner = volume_ref("owned-1", &node, tls(&pki, &pki.owner));
    owner
        .create(4 * MIB, "owner-tool", timeouts())
        .expect("create");
    volume_ref("owned-2", &node, tls(&pki, &pki.owner))
        .create(4 * MIB, "owner-tool", timeouts())
        .expect("create");

    let hostile = volume_ref("owned-1", &node, tls(&pki, &pki.hostile));
    let err = hostile
        .grow(8 * MIB, "hostile-tool", timeouts())
        .expect_err("hostile resize");
    assert!(
        err.contains("policy does not let client 'hostile' resize volume 'owned-1'"),
        "{err}"
    );
    let err = hostile
        .delete("hostile-tool", timeouts())
        .expect_err("hostile delete");
    assert!(
        err.contains("policy does not let client 'hostile' delete volume 'owned-1'"),
        "{err}"
    );
    // No rule opens owned-2 to it: refused at the handshake.
    let err = volume_ref("owned-2", &node, tls(&pki, &pki.hostile))
        .delete("hostile-tool", timeouts())
        .expect_err("hostile open");
    assert!(
        err.contains("policy does not let client 'hostile' open volume 'owned-2'"),
        "{err}"
    );
    // Nor can it create a volume of its own.
    let err = volume_ref("mine", &node, tls(&pki, &pki.hostile))
        .create(4 * MIB, "hostile-tool", timeouts())
        .expect_err("hostile create");
    assert!(err.to_string().contains("open volume 'mine'"), "{err}");

    // Logged and counted; both volumes are intact.
    assert!(node.wait_for_log("refused by the policy"), "{}", node.log());
    assert_eq!(node.admin().stats().policy_refusals, 4);
    assert_eq!(owner.lookup("owner-tool", timeouts()), Ok(Some(4 * MIB)));
    owner
        .grow(8 * MIB, "owner-tool", timeouts())
        .expect("owner grows");

    // A changed policy is used from the next connection on.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&policy, "owner * all\nhostile owned-1 open,delete\n").expect("policy");
    hostile
        .delete("hostile-tool", timeouts())
        .expect("delete allowed now");
    assert_eq!(owner.lookup("owner-tool", timeouts()), Ok(None));
}

#[test]
fn a_plaintext_client_is_anonymous_to_the_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("policy");
    std::fs::write(&policy, "- scratch open\n* * all\n").expect("policy");
    let node = MockNode::start(&["--policy", policy.to_str().expect("path")]);
    let mut client = NodeClient::open(node.addr, handshake("scratch", MIB, 65536, 1, 0));
    let (reply, _) = client
        .call(Op::Delete(pb::Delete {}), &[])
        .expect("delete reply");
    assert_eq!(reply.status, pb::Status::Refused as i32);
    assert!(
        reply
            .message
            .contains("does not let plaintext client (no certificate) delete volume 'scratch'"),
        "{}",
        reply.message
    );
    let reply = NodeClient::handshake_reply(node.addr, handshake("other", MIB, 65536, 1, 0));
    assert_eq!(reply.status, pb::Status::Refused as i32);
    assert!(
        reply.message.contains("open volume 'other'"),
        "{}",
        reply.message
    );
    assert_eq!(node.admin().stats().policy_refusals, 2);
}

#[test]
fn a_session_moves_forward_by_a_bounded_step() {
    // Plaintext: the bound holds for every client, certified or not.
    let node = MockNode::start(&[]);
    let at = |session| {
        let mut hs = handshake("steps", MIB, 65536, 1, 0);
        hs.client_id = "stepper".into();
        hs.session = session;
        NodeClient::handshake_reply(node.addr, hs)
    };
    // A client the node does not know yet starts anywhere.
    assert_eq!(at(5).status, pb::Status::Ok as i32);
    // The end of the range is refused, and so is anything past the bound.
    for session in [u64::MAX, 5 + (1 << 40) + 1] {
        let reply = at(session);
        assert_eq!(reply.status, pb::Status::Refused as i32);
        assert!(reply.message.contains("more than"), "{}", reply.message);
    }
    // The client goes on from where it was.
    assert_eq!(at(6).status, pb::Status::Ok as i32);
    // A recovered daemon's jump to the next generation is taken.
    assert_eq!(at(1 << 32).status, pb::Status::Ok as i32);
    assert_eq!(at(2 << 32).status, pb::Status::Ok as i32);
}

/// Inquiries under a policy (docs/protocol.md 13.4): a client lists only
/// the volumes it may open, and a describe of another's volume is refused
/// like its handshake would be, counted and logged.
#[test]
fn an_inquiry_shows_a_client_only_what_the_policy_lets_it_open() {
    let pki = pki();
    let policy = pki.dir.path().join("policy");
    std::fs::write(&policy, "owner * all\nhostile theirs-* all\n").expect("policy");
    let node = tls_node(&pki, &["--policy", policy.to_str().expect("path")]);
    for name in ["owned-1", "owned-2"] {
        volume_ref(name, &node, tls(&pki, &pki.owner))
            .create(4 * MIB, "owner-tool", timeouts())
            .expect("create");
    }
    volume_ref("theirs-1", &node, tls(&pki, &pki.hostile))
        .create(4 * MIB, "hostile-tool", timeouts())
        .expect("create");
    let ask = |leaf: &Leaf| {
        let tls = tls(&pki, leaf);
        let asker = netblk::inquiry::Asker {
            tls: Some(&tls),
            timeout: Duration::from_secs(5),
        };
        let names: Vec<String> = asker
            .list(node.addr)
            .expect("list")
            .into_iter()
            .map(|d| d.volume)
            .collect();
        (names, asker.describe(node.addr, "owned-1"))
    };
    let (names, owned) = ask(&pki.owner);
    assert_eq!(names, ["owned-1", "owned-2", "theirs-1"]);
    assert!(owned.expect("describe").is_some());
    let before = node.admin().stats().policy_refusals;
    let (names, owned) = ask(&pki.hostile);
    assert_eq!(
        names,
        ["theirs-1"],
        "the listing leaves out what it may not open"
    );
    let err = owned.expect_err("describe of another's volume");
    assert!(
        err.contains("policy does not let client 'hostile' open volume 'owned-1'"),
        "{err}"
    );
    // The refused describe is counted; the listing's omissions are not.
    assert_eq!(node.admin().stats().policy_refusals, before + 1);
}

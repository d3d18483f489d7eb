//! The CSI driver on the host, over its unix socket: Identity, the
//! Controller against real mock nodes, and the Node service's argument
//! checks (mapping needs ublk: the VM scenario `csi` covers it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use netblk_csi::controller::Controller;
use netblk_csi::daemons::Daemons;
use netblk_csi::identity::Identity;
use netblk_csi::node::Node;
use netblk_csi::pb;
use netblk_csi::pb::volume_capability::access_mode::Mode;
use netblk_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use netblk_csi::server::Services;
use netblk_tests::cluster::Cluster;
use netblk_tests::csi::{Csi, Plugin};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn controller_plugin(ready: Arc<AtomicBool>) -> Plugin {
    Plugin::start(Services {
        identity: Identity {
            ready,
            controller: true,
        },
        controller: Some(Controller::new()),
        node: None,
    })
}

fn node_plugin() -> Plugin {
    Plugin::start(Services {
        identity: Identity {
            ready: Arc::new(AtomicBool::new(true)),
            controller: false,
        },
        controller: None,
        node: Some(Node {
            node_id: "host-a".into(),
            daemons: Daemons {
                netblk: PathBuf::from("/nonexistent/netblk"),
                log_dir: std::env::temp_dir().join("netblk-csi-test-logs"),
                tls: None,
                pools: Default::default(),
            },
            timeouts: netblk_csi::controller::NODE_TIMEOUTS,
            busy: Default::default(),
        }),
    })
}

fn capability(access: AccessType, mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block() -> pb::VolumeCapability {
    capability(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter)
}

fn ext4() -> pb::VolumeCapability {
    capability(
        AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        }),
        Mode::SingleNodeWriter,
    )
}

fn create_request(cluster: &Cluster, name: &str, required: i64) -> pb::CreateVolumeRequest {
    let nodes: Vec<String> = cluster.addrs().iter().map(ToString::to_string).collect();
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![ext4()],
        parameters: HashMap::from([
            ("nodes".to_string(), nodes.join(",")),
            ("stripeUnit".to_string(), "65536".to_string()),
            ("queues".to_string(), "2".to_string()),
        ]),
        secrets: HashMap::new(),
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    result.expect_err("the call must fail").code()
}

#[test]
fn identity_names_the_plugin_its_capabilities_and_readiness() {
    let ready = Arc::new(AtomicBool::new(false));
    let plugin = controller_plugin(Arc::clone(&ready));
    let csi = plugin.client();
    let info = csi
        .call(
            csi.identity
                .clone()
                .get_plugin_info(pb::GetPluginInfoRequest {}),
        )
        .expect("info");
    assert_eq!(info.name, "csi.netblk.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = csi
        .call(
            csi.identity
                .clone()
                .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}),
        )
        .expect("capabilities")
        .capabilities;
    let has =
        |want: &pb::plugin_capability::Type| caps.iter().any(|c| c.r#type.as_ref() == Some(want));
    assert!(has(&pb::plugin_capability::Type::Service(
        pb::plugin_capability::Service {
            r#type: pb::plugin_capability::service::Type::ControllerService as i32
        }
    )));
    assert!(has(&pb::plugin_capability::Type::VolumeExpansion(
        pb::plugin_capability::VolumeExpansion {
            r#type: pb::plugin_capability::volume_expansion::Type::Online as i32
        }
    )));
    let probe = |csi: &Csi| {
        csi.call(csi.identity.clone().probe(pb::ProbeRequest {}))
            .expect("probe")
            .ready
    };
    assert_eq!(probe(&csi), Some(false), "not ready while starting");
    ready.store(true, Ordering::Release);
    assert_eq!(probe(&csi), Some(true));
}

#[test]
fn the_controller_creates_validates_expands_and_deletes_on_the_nodes() {
    let cluster = Cluster::start(3);
    let plugin = controller_plugin(Arc::new(AtomicBool::new(true)));
    let csi = plugin.client();
    let controller = || csi.controller.clone();

    let caps = csi
        .call(controller().controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}))
        .expect("capabilities")
        .capabilities;
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|pb::controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use pb::controller_service_capability::rpc::Type as Rpc;
    assert_eq!(
        rpcs,
        vec![Rpc::CreateDeleteVolume as i32, Rpc::ExpandVolume as i32]
    );

    // Created once; the same request again is the same volume.
    let req = create_request(&cluster, "pvc-host", 40 * MIB + 1);
    let volume = csi
        .call(controller().create_volume(req.clone()))
        .expect("create")
        .volume
        .expect("a volume");
    assert_eq!(volume.capacity_bytes, 41 * MIB, "rounded up to whole MiB");
    assert_eq!(
        volume.volume_context.get("queues").map(String::as_str),
        Some("2")
    );
    assert!(volume.volume_id.starts_with("pvc-host/65536/"));
    // The nodes' volume identities are pinned in the context, in node
    // order, and the volume is marked as made for a filesystem.
    let found = netblk::manage::VolumeRef {
        replicas: 1,
        name: "pvc-host".into(),
        stripe_unit: 65536,
        nodes: cluster.addrs(),
        tls: None,
    }
    .find("csi-test", netblk_csi::controller::NODE_TIMEOUTS)
    .expect("find")
    .expect("on the nodes");
    assert_eq!(
        volume.volume_context.get("volumeIds"),
        Some(&found.volume_ids.join(",")),
        "{:?}",
        volume.volume_context
    );
    assert_eq!(
        volume.volume_context.get("createdFor").map(String::as_str),
        Some("filesystem")
    );
    let again = csi
        .call(controller().create_volume(req.clone()))
        .expect("create again")
        .volume
        .expect("a volume");
    assert_eq!(again, volume, "same name, same answer");
    for node in &cluster.nodes {
        assert_eq!(node.admin().stats().volumes, 1, "made on every node");
    }
    // The same name at a size it does not have.
    let bigger = create_request(&cluster, "pvc-host", 100 * MIB);
    assert_eq!(
        code(csi.call(controller().create_volume(bigger))),
        Code::AlreadyExists
    );

    // Bad arguments.
    let mut bad = req.clone();
    bad.name = String::new();
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.name = "bad/name".into();
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.volume_capabilities.clear();
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.volume_capabilities = vec![capability(
        AccessType::Block(BlockVolume {}),
        Mode::MultiNodeMultiWriter,
    )];
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.parameters.remove("nodes");
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::InvalidArgument
    );
    let mut bad = req.clone();
    bad.capacity_range = Some(pb::CapacityRange {
        required_bytes: 10 * MIB + 1,
        limit_bytes: 10 * MIB + 2,
    });
    assert_eq!(
        code(csi.call(controller().create_volume(bad))),
        Code::OutOfRange
    );

    // Validate.
    let validate = |id: &str, caps: Vec<pb::VolumeCapability>| {
        csi.call(
            controller().validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: caps,
                ..Default::default()
            }),
        )
    };
    let ok = validate(&volume.volume_id, vec![block(), ext4()]).expect("validate");
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let multi = capability(AccessType::Block(BlockVolume {}), Mode::MultiNodeReaderOnly);
    let no = validate(&volume.volume_id, vec![multi]).expect("validate");
    assert!(no.confirmed.is_none());
    assert!(no.message.contains("one node at a time"), "{}", no.message);
    assert_eq!(code(validate("", vec![block()])), Code::InvalidArgument);
    assert_eq!(
        code(validate(&volume.volume_id, vec![])),
        Code::InvalidArgument
    );
    assert_eq!(code(validate("not-ours", vec![block()])), Code::NotFound);
    let absent = volume.volume_id.replacen("pvc-host", "pvc-absent", 1);
    assert_eq!(code(validate(&absent, vec![block()])), Code::NotFound);

    // Expand: the nodes grow; twice is the same answer; a node must follow.
    let expand = |id: &str, bytes: i64| {
        csi.call(
            controller().controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
    };
    for _ in 0..2 {
        let grown = expand(&volume.volume_id, 80 * MIB).expect("expand");
        assert_eq!(grown.capacity_bytes, 80 * MIB);
        assert!(grown.node_expansion_required);
    }
    let hs = netblk_tests::handshake("pvc-host", 80 << 20, 65536, 3, 0);
    let reply = netblk_tests::NodeClient::handshake_reply(cluster.nodes[0].addr, hs);
    assert_eq!(reply.status, 0, "node 0 holds 80 MiB: {}", reply.message);
    assert_eq!(code(expand(&absent, 80 * MIB)), Code::NotFound);
    assert_eq!(code(expand("", 80 * MIB)), Code::InvalidArgument);
    let no_range = csi.call(controller().controller_expand_volume(
        pb::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            ..Default::default()
        },
    ));
    assert_eq!(code(no_range), Code::InvalidArgument);

    // Delete, twice; an id that is not ours is deleted already.
    let delete = |id: &str| {
        csi.call(controller().delete_volume(pb::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        }))
    };
    delete(&volume.volume_id).expect("delete");
    delete(&volume.volume_id).expect("delete again");
    delete("not-ours").expect("an id that is not ours");
    assert_eq!(code(delete("")), Code::InvalidArgument);
    for node in &cluster.nodes {
        assert_eq!(node.admin().stats().volumes, 0, "deleted from every node");
    }
    assert_eq!(
        code(validate(&volume.volume_id, vec![block()])),
        Code::NotFound
    );
}

#[test]
fn the_node_service_checks_its_arguments_before_touching_the_host() {
    let plugin = node_plugin();
    let csi = plugin.client();
    let node = || csi.node.clone();
    let info = csi
        .call(node().node_get_info(pb::NodeGetInfoRequest {}))
        .expect("info");
    assert_eq!(info.node_id, "host-a");
    use pb::node_service_capability::rpc::Type as Rpc;
    let caps: Vec<i32> = csi
        .call(node().node_get_capabilities(pb::NodeGetCapabilitiesRequest {}))
        .expect("capabilities")
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|pb::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        Rpc::StageUnstageVolume,
        Rpc::GetVolumeStats,
        Rpc::ExpandVolume,
    ] {
        assert!(caps.contains(&(want as i32)), "{want:?}");
    }

    let id = "pvc-n/65536/127.0.0.1:1,127.0.0.1:2";
    let stage = |id: &str, path: &str, cap: Option<pb::VolumeCapability>| {
        csi.call(node().node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
            volume_capability: cap,
            ..Default::default()
        }))
    };
    assert_eq!(
        code(stage("", "/tmp/s", Some(block()))),
        Code::InvalidArgument
    );
    assert_eq!(code(stage(id, "", Some(block()))), Code::InvalidArgument);
    assert_eq!(code(stage(id, "/tmp/s", None)), Code::InvalidArgument);
    let btrfs = capability(
        AccessType::Mount(MountVolume {
            fs_type: "btrfs".into(),
            ..Default::default()
        }),
        Mode::SingleNodeWriter,
    );
    assert_eq!(
        code(stage(id, "/tmp/s", Some(btrfs))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(stage("garbage", "/tmp/s", Some(block()))),
        Code::NotFound
    );
    let mut bad_queues = pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: "/tmp/s".into(),
        volume_capability: Some(block()),
        ..Default::default()
    };
    bad_queues
        .volume_context
        .insert("queues".into(), "0".into());
    assert_eq!(
        code(csi.call(node().node_stage_volume(bad_queues.clone()))),
        Code::InvalidArgument
    );
    // Pinned identities that do not fit the volume's two nodes.
    for ids in ["0a1b", "0a1b,zz", "0a1b,,", ""] {
        let mut bad_ids = bad_queues.clone();
        bad_ids.volume_context = HashMap::from([("volumeIds".to_string(), ids.to_string())]);
        let status = csi
            .call(node().node_stage_volume(bad_ids))
            .expect_err("bad volumeIds");
        assert_eq!(status.code(), Code::InvalidArgument, "{ids}: {status:?}");
        assert!(status.message().contains("volumeIds"), "{status:?}");
    }

    let publish = |id: &str, staging: &str, target: &str, cap: Option<pb::VolumeCapability>| {
        csi.call(node().node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: cap,
            ..Default::default()
        }))
    };
    assert_eq!(
        code(publish("", "/s", "/t", Some(block()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(publish(id, "", "/t", Some(block()))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(publish(id, "/s", "", Some(block()))),
        Code::InvalidArgument
    );
    assert_eq!(code(publish(id, "/s", "/t", None)), Code::InvalidArgument);
    assert_eq!(
        code(publish(id, "/s", "/t", Some(block()))),
        Code::FailedPrecondition,
        "not staged here"
    );

    let dir = tempfile::tempdir().expect("dir");
    let target = dir.path().join("target");
    std::fs::create_dir(&target).expect("target");
    let unpublish = |id: &str, target: &str| {
        csi.call(
            node().node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.into(),
            }),
        )
    };
    let t = target.to_string_lossy().to_string();
    unpublish(id, &t).expect("unpublish a target that is not mounted");
    assert!(!target.exists(), "the target is removed");
    unpublish(id, &t).expect("unpublish twice");
    assert_eq!(code(unpublish("", &t)), Code::InvalidArgument);
    assert_eq!(code(unpublish(id, "")), Code::InvalidArgument);

    let unstage = |id: &str, path: &str| {
        csi.call(node().node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: path.into(),
        }))
    };
    unstage(id, &t).expect("unstage what is not staged");
    assert_eq!(code(unstage("", &t)), Code::InvalidArgument);
    assert_eq!(code(unstage(id, "")), Code::InvalidArgument);

    let stats = |id: &str, path: &str| {
        csi.call(node().node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            staging_target_path: String::new(),
        }))
    };
    assert_eq!(code(stats("", "/tmp")), Code::InvalidArgument);
    assert_eq!(code(stats(id, "")), Code::InvalidArgument);
    assert_eq!(code(stats(id, "/nonexistent/path")), Code::NotFound);
    assert_eq!(code(stats(id, "/tmp")), Code::NotFound, "not mapped here");

    let expand = |id: &str, path: &str| {
        csi.call(node().node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.into(),
            ..Default::default()
        }))
    };
    assert_eq!(code(expand("", "/tmp")), Code::InvalidArgument);
    assert_eq!(code(expand(id, "")), Code::InvalidArgument);
    assert_eq!(code(expand(id, "/nonexistent/path")), Code::NotFound);
    assert_eq!(code(expand("garbage", "/tmp")), Code::NotFound);
}

/// Arguments are checked before the volume id is looked at: a request that
/// lacks a required field is INVALID_ARGUMENT even with an id that names no
/// volume of ours (what csi-sanity sends), never NOT_FOUND.
#[test]
fn missing_arguments_are_invalid_whatever_the_volume_id() {
    let node_plugin = node_plugin();
    let csi = node_plugin.client();
    let node = || csi.node.clone();
    let id = "not-ours";
    let invalid = |what: &str, result: Result<(), tonic::Status>| {
        assert_eq!(
            result.map_err(|s| s.code()),
            Err(Code::InvalidArgument),
            "{what}"
        );
    };
    invalid(
        "NodeStageVolume without a staging path",
        csi.call(node().node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.into(),
            volume_capability: Some(block()),
            ..Default::default()
        }))
        .map(drop),
    );
    invalid(
        "NodeStageVolume without a capability",
        csi.call(node().node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: "/tmp/s".into(),
            ..Default::default()
        }))
        .map(drop),
    );
    invalid(
        "NodePublishVolume without a target path",
        csi.call(node().node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: "/tmp/s".into(),
            volume_capability: Some(block()),
            ..Default::default()
        }))
        .map(drop),
    );
    invalid(
        "NodePublishVolume without a capability",
        csi.call(node().node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: "/tmp/s".into(),
            target_path: "/tmp/t".into(),
            ..Default::default()
        }))
        .map(drop),
    );
    invalid(
        "NodeGetVolumeStats without a volume path",
        csi.call(node().node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .map(drop),
    );
    invalid(
        "NodeExpandVolume without a volume path",
        csi.call(node().node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .map(drop),
    );

    let controller_plugin = controller_plugin(Arc::new(AtomicBool::new(true)));
    let csi = controller_plugin.client();
    let controller = || csi.controller.clone();
    invalid(
        "ValidateVolumeCapabilities without capabilities",
        csi.call(controller().validate_volume_capabilities(
            pb::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                ..Default::default()
            },
        ))
        .map(drop),
    );
    invalid(
        "ControllerExpandVolume without a capacity range",
        csi.call(
            controller().controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            }),
        )
        .map(drop),
    );
}

/// CSI with mutual TLS: a controller given the CA, certificate and key
/// provisions, expands and deletes volumes on TLS nodes (one without them
/// is refused by the nodes); a node plugin given them looks the volume up
/// over TLS and passes the files to `netblk map`.
#[test]
fn with_tls_files_the_plugins_reach_tls_nodes() {
    let pki_dir = tempfile::tempdir().expect("pki dir");
    let (ca, node_leaf, client) = netblk_tls::testpki::standard(pki_dir.path()).expect("pki");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let (cert, key, client_ca) = (path(&node_leaf.cert), path(&node_leaf.key), path(&ca));
    let cluster = Cluster::start_with(
        3,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &client_ca,
        ],
    );
    let tls = netblk_csi::volume::tls(
        Some(ca.clone()),
        Some(client.cert.clone()),
        Some(client.key.clone()),
    )
    .expect("TLS files");

    let plaintext = controller_plugin(Arc::new(AtomicBool::new(true)));
    let csi = plaintext.client();
    let refused = csi.call(csi.controller.clone().create_volume(create_request(
        &cluster,
        "pvc-tls",
        16 * MIB,
    )));
    assert_eq!(
        code(refused),
        Code::Unavailable,
        "TLS nodes refuse plaintext"
    );

    let plugin = netblk_tests::csi::controller_plugin(Controller {
        tls: tls.clone(),
        ..Controller::new()
    });
    let csi = plugin.client();
    let controller = || csi.controller.clone();
    let volume = csi
        .call(controller().create_volume(create_request(&cluster, "pvc-tls", 16 * MIB)))
        .expect("create over TLS")
        .volume
        .expect("volume");
    assert_eq!(volume.capacity_bytes, 16 * MIB);
    let grown = csi
        .call(
            controller().controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: volume.volume_id.clone(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .expect("expand over TLS");
    assert_eq!(grown.capacity_bytes, 32 * MIB);

    // The node plugin: the lookup goes over TLS, then `netblk map` is run
    // with the files (a stand-in that writes down its arguments).
    let bin_dir = tempfile::tempdir().expect("bin dir");
    let (node_plugin, args_file) = netblk_tests::csi::node_plugin_with_stand_in(
        bin_dir.path(),
        tls.clone(),
        Default::default(),
    );
    let node_csi = node_plugin.client();
    let staged = node_csi.call(node_csi.node.clone().node_stage_volume(
        pb::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: bin_dir.path().join("staging").display().to_string(),
            volume_capability: Some(block()),
            ..Default::default()
        },
    ));
    let status = staged.expect_err("the stand-in netblk fails");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let args = std::fs::read_to_string(&args_file).expect("netblk map was run");
    for want in [
        format!("--tls-ca {}", ca.display()),
        format!("--tls-cert {}", client.cert.display()),
        format!("--tls-key {}", client.key.display()),
        "--size 33554432".to_string(),
    ] {
        assert!(args.contains(&want), "{want} in: {args}");
    }

    csi.call(controller().delete_volume(pb::DeleteVolumeRequest {
        volume_id: volume.volume_id.clone(),
        secrets: HashMap::new(),
    }))
    .expect("delete over TLS");
}

/// `netblk map --volume-ids` (and a volume file's `volume_ids`) takes one
/// hex identity per node, checked before anything is touched.
#[test]
fn map_checks_the_pinned_volume_identities_it_is_given() {
    let dir = tempfile::tempdir().expect("dir");
    let map = |extra: &[&str]| {
        let out = std::process::Command::new(netblk_tests::netblk_bin())
            .args(["map", "--volume", "v", "--size", "64M"])
            .args(["--nodes", "127.0.0.1:1,127.0.0.1:2"])
            .args(extra)
            .env("NETBLK_STATE_DIR", dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("netblk map");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = map(&["--volume-ids", "0a1b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("1 volume identities given for 2 node(s)"),
        "{err}"
    );
    let (code, err) = map(&["--volume-ids", "0a1b,nothex"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("volume identity of node 1 'nothex'"), "{err}");
    let file = dir.path().join("v.toml");
    std::fs::write(&file, "volume_ids = [\"0a\", \"0b\", \"0c\"]\n").expect("write");
    let (code, err) = map(&["--config", &file.to_string_lossy()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("3 volume identities given for 2 node(s)"),
        "{err}"
    );
    assert!(err.contains("v.toml"), "names the file: {err}");
}

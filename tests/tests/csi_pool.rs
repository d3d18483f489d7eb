//! A StorageClass over a pool (issue 26): CreateVolume places the volume on
//! the pool's nodes and writes the placement into their records; Expand,
//! Delete and the node plugin's map use the stored placement, whatever
//! the pool file says since.

use std::collections::HashMap;
use std::path::Path;

use netblk_csi::controller::Controller;
use netblk_csi::pb;
use netblk_csi::pb::volume_capability::access_mode::Mode;
use netblk_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume};
use netblk_csi::pools::Pools;
use netblk_tests::MockNode;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn write_pool(dir: &Path, nodes: &[(std::net::SocketAddr, &str, u32)]) {
    let mut text = String::new();
    for (addr, zone, weight) in nodes {
        text.push_str(&format!(
            "[[node]]\naddress = \"{addr}\"\nzone = \"{zone}\"\nweight = {weight}\n"
        ));
    }
    std::fs::write(dir.join("fast.toml"), text).expect("pool file");
}

fn block() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn request(required: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: "pvc-pool".into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![block()],
        parameters: HashMap::from([
            ("pool".to_string(), "fast".to_string()),
            ("replicas".to_string(), "2".to_string()),
            ("spread".to_string(), "zone".to_string()),
            ("stripeUnit".to_string(), "65536".to_string()),
        ]),
        secrets: HashMap::new(),
    }
}

fn held(addr: std::net::SocketAddr) -> Option<netblk_protocol::pb::VolumeDescription> {
    netblk_tests::described(addr, "pvc-pool")
}

#[test]
fn a_pool_storage_class_places_volumes_and_later_calls_use_the_stored_placement() {
    let pools_dir = tempfile::tempdir().expect("pool dir");
    let nodes: Vec<MockNode> = (0..4)
        .map(|_| MockNode::start(&["--store", "memory"]))
        .collect();
    let entries: Vec<_> = nodes
        .iter()
        .zip(["a", "a", "b", "b"])
        .map(|(n, z)| (n.addr, z, 1))
        .collect();
    write_pool(pools_dir.path(), &entries);
    let pools = Pools {
        dir: pools_dir.path().to_path_buf(),
    };
    let plugin = netblk_tests::csi::controller_plugin(Controller {
        pools: pools.clone(),
        ..Controller::new()
    });
    let csi = plugin.client();
    let controller = || csi.controller.clone();
    let volume = csi
        .call(controller().create_volume(request(16 * MIB)))
        .expect("create")
        .volume
        .expect("volume");
    assert_eq!(volume.volume_id, "pvc-pool/65536/pool=fast/2");
    assert_eq!(volume.capacity_bytes, 16 * MIB);
    // Two members, one per zone, each with the record naming both.
    let members: Vec<_> = entries.iter().filter(|e| held(e.0).is_some()).collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert_ne!(members[0].1, members[1].1, "replicas in one zone");
    let record = held(members[0].0).and_then(|d| d.record).expect("record");
    assert_eq!(record.members.len(), 2);
    // The same call again: the same volume; a larger one: ALREADY_EXISTS.
    let again = csi
        .call(controller().create_volume(request(16 * MIB)))
        .expect("create again")
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, volume.volume_id);
    assert_eq!(
        again.volume_context.get("volumeIds"),
        volume.volume_context.get("volumeIds")
    );
    let bigger = csi.call(controller().create_volume(pb::CreateVolumeRequest {
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 32 * MIB,
        }),
        ..request(32 * MIB)
    }));
    assert_eq!(
        bigger.expect_err("exists smaller").code(),
        Code::AlreadyExists
    );

    // The pool changes: a heavy fifth node in a third zone. Expand and the
    // node plugin still go to the members.
    let fifth = MockNode::start(&["--store", "memory"]);
    let mut grown = entries.clone();
    grown.push((fifth.addr, "c", 1000));
    write_pool(pools_dir.path(), &grown);
    let expanded = csi
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
        .expect("expand");
    assert_eq!(expanded.capacity_bytes, 32 * MIB);
    for m in &members {
        assert_eq!(held(m.0).expect("held").volume_size, 32 << 20);
    }
    assert!(held(fifth.addr).is_none(), "nothing moved to the new node");

    // The node plugin maps with the pool file (a stand-in netblk writes
    // down its arguments and fails).
    let bin_dir = tempfile::tempdir().expect("bin dir");
    let (node_plugin, args_file) =
        netblk_tests::csi::node_plugin_with_stand_in(bin_dir.path(), None, pools);
    let node_csi = node_plugin.client();
    let staged = node_csi.call(node_csi.node.clone().node_stage_volume(
        pb::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: bin_dir.path().join("staging").display().to_string(),
            volume_capability: Some(block()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        },
    ));
    assert_eq!(
        staged.expect_err("the stand-in fails").code(),
        Code::Internal
    );
    let args = std::fs::read_to_string(&args_file).expect("netblk map was run");
    let pool_file = pools_dir.path().join("fast.toml");
    for want in [
        "map --volume pvc-pool --size 33554432".to_string(),
        format!("--pool {}", pool_file.display()),
        "--replicas 2 --takeover".to_string(),
        "--volume-ids".to_string(),
    ] {
        assert!(args.contains(&want), "{want} in: {args}");
    }
    assert!(!args.contains("--nodes"), "{args}");

    // Delete: gone from the members; again: done already.
    for _ in 0..2 {
        csi.call(controller().delete_volume(pb::DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            secrets: HashMap::new(),
        }))
        .expect("delete");
    }
    for m in &members {
        assert!(held(m.0).is_none(), "{} still holds it", m.0);
    }
    // A pool the plugin does not have: the StorageClass cannot be used.
    let missing = csi.call(controller().create_volume(pb::CreateVolumeRequest {
        parameters: HashMap::from([("pool".to_string(), "none".to_string())]),
        ..request(16 * MIB)
    }));
    let status = missing.expect_err("no such pool");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("none.toml"), "{status:?}");
}

/// The lines of `text` under `key` (the next, more indented ones),
/// dedented: a YAML block scalar or mapping, read without a YAML parser.
fn block_under(text: &str, key: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != key);
    let header = lines.next().unwrap_or_else(|| panic!("no {key}"));
    let indent = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let cut = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(cut..).unwrap_or("").to_string())
        .collect()
}

/// The shipped pool and StorageClass go together: the pool file parses and
/// can hold the class's volumes, and the class's parameters are accepted.
#[test]
fn the_shipped_pool_and_its_storage_class_fit_together() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let read = |f: &str| std::fs::read_to_string(root.join(f)).expect("manifest");
    let pool_text = block_under(&read("pools.yaml"), "mock.toml: |").join("\n");
    let pool = netblk::pool::Pool::parse(&pool_text).expect("the shipped pool parses");
    let class: HashMap<String, String> =
        block_under(&read("storageclass-pool.yaml"), "parameters:")
            .iter()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
            .collect();
    let params = netblk_csi::volume::Parameters::parse(&class).expect("the class's parameters");
    let placed = params.pool.expect("a pool class");
    assert_eq!(placed.name, "mock", "the class names the shipped pool");
    netblk::placement::place(
        &pool,
        "pvc-any",
        placed.columns,
        params.replicas,
        placed.spread,
    )
    .expect("the pool can place the class's volumes");
}

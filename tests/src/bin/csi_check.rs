//! `netblk-csi-check`: drives the CSI driver as Kubernetes would, over its
//! unix socket, and checks every answer; the VM scenario `csi` runs it
//! against real mock nodes and a real ublk kernel.
//!
//! ```text
//! netblk-csi-check SOCKET lifecycle NODES      the whole lifecycle, block, ext4 and xfs
//!     (NODES: IP:PORT,... or the parameters themselves, KEY=VALUE,..., e.g. pool=vm,replicas=2)
//! netblk-csi-check SOCKET formatting NODES     which volumes NodeStage formats (plaintext nodes)
//! netblk-csi-check SOCKET wait-ready           until Probe says ready (180 s at most)
//! netblk-csi-check SOCKET create NAME MIB NODES    prints the volume id and context (KEY=VALUE;...)
//! netblk-csi-check SOCKET stage ID STAGING block|ext4|xfs [CONTEXT]
//! netblk-csi-check SOCKET publish ID STAGING TARGET block|ext4|xfs
//! netblk-csi-check SOCKET unpublish ID TARGET
//! netblk-csi-check SOCKET unstage ID STAGING
//! netblk-csi-check SOCKET delete ID
//! ```
//! Exits 0 when every check passed; otherwise prints what failed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use netblk_csi::pb;
use netblk_csi::pb::volume_capability::access_mode::Mode;
use netblk_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use netblk_tests::csi::Csi;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// A volume's size when made, MiB (mkfs.xfs wants 300 MiB at least).
const BASE: u64 = 320;
/// Its size once expanded, MiB.
const GROWN: u64 = 448;

type Checked<T = ()> = Result<T, String>;

fn capability(kind: &str, mode: Mode) -> Checked<pb::VolumeCapability> {
    let access = match kind {
        "block" => AccessType::Block(BlockVolume {}),
        "ext4" | "xfs" => AccessType::Mount(MountVolume {
            fs_type: kind.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: String::new(),
        }),
        other => return Err(format!("unknown kind '{other}' (block, ext4, xfs)")),
    };
    Ok(pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn ok<T>(what: &str, result: Result<T, tonic::Status>) -> Checked<T> {
    result.map_err(|s| format!("{what}: {:?}: {}", s.code(), s.message()))
}

fn fails_with<T: std::fmt::Debug>(
    what: &str,
    want: Code,
    result: Result<T, tonic::Status>,
) -> Checked<String> {
    match result {
        Err(s) if s.code() == want => Ok(s.message().to_string()),
        Err(s) => Err(format!(
            "{what}: wanted {want:?}, got {:?}: {}",
            s.code(),
            s.message()
        )),
        Ok(v) => Err(format!("{what}: wanted {want:?}, it succeeded: {v:?}")),
    }
}

fn check(cond: bool, what: impl Into<String>) -> Checked {
    if cond { Ok(()) } else { Err(what.into()) }
}

/// A StorageClass's parameters: `NODES` (IP:PORT,...) as the node list,
/// or `KEY=VALUE,...` as the parameters themselves (a pool's: `pool=NAME,
/// replicas=2,spread=zone`); with a 64 KiB stripe unit and 2 queues.
fn parameters(nodes: &str) -> HashMap<String, String> {
    let mut params = HashMap::from([
        ("stripeUnit".to_string(), "65536".to_string()),
        ("queues".to_string(), "2".to_string()),
    ]);
    if nodes.contains('=') {
        params.extend(
            nodes
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
    } else {
        params.insert("nodes".to_string(), nodes.to_string());
    }
    params
}

struct Driver {
    csi: Csi,
}

impl Driver {
    fn create(&self, name: &str, mib: u64, nodes: &str) -> Checked<pb::Volume> {
        self.create_as(name, mib, nodes, "ext4")
    }

    /// Creates a volume for `kind` access.
    fn create_as(&self, name: &str, mib: u64, nodes: &str, kind: &str) -> Checked<pb::Volume> {
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (mib * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(kind, Mode::SingleNodeWriter)?],
            parameters: parameters(nodes),
            secrets: HashMap::new(),
        };
        let c = &self.csi;
        ok(
            "CreateVolume",
            c.call(c.controller.clone().create_volume(req)),
        )?
        .volume
        .ok_or_else(|| "CreateVolume returned no volume".to_string())
    }

    fn stage(&self, volume: &pb::Volume, staging: &Path, kind: &str) -> Checked {
        let c = &self.csi;
        let req = pb::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(capability(kind, Mode::SingleNodeWriter)?),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        ok(
            "NodeStageVolume",
            c.call(c.node.clone().node_stage_volume(req)),
        )
        .map(drop)
    }

    fn publish(
        &self,
        volume: &pb::Volume,
        staging: &Path,
        target: &Path,
        kind: &str,
        readonly: bool,
    ) -> Checked {
        let c = &self.csi;
        let req = pb::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(capability(kind, Mode::SingleNodeWriter)?),
            readonly,
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        ok(
            "NodePublishVolume",
            c.call(c.node.clone().node_publish_volume(req)),
        )
        .map(drop)
    }

    fn unpublish(&self, id: &str, target: &Path) -> Checked {
        let c = &self.csi;
        let req = pb::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into(),
        };
        ok(
            "NodeUnpublishVolume",
            c.call(c.node.clone().node_unpublish_volume(req)),
        )
        .map(drop)
    }

    fn unstage(&self, id: &str, staging: &Path) -> Checked {
        let c = &self.csi;
        let req = pb::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
        };
        ok(
            "NodeUnstageVolume",
            c.call(c.node.clone().node_unstage_volume(req)),
        )
        .map(drop)
    }

    fn delete(&self, id: &str) -> Checked {
        let c = &self.csi;
        let req = pb::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        };
        ok(
            "DeleteVolume",
            c.call(c.controller.clone().delete_volume(req)),
        )
        .map(drop)
    }

    fn controller_expand(&self, id: &str, mib: u64) -> Checked<pb::ControllerExpandVolumeResponse> {
        let c = &self.csi;
        let req = pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (mib * MIB) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        ok(
            "ControllerExpandVolume",
            c.call(c.controller.clone().controller_expand_volume(req)),
        )
    }

    fn node_expand(
        &self,
        id: &str,
        path: &Path,
        staging: &Path,
        kind: &str,
        mib: u64,
    ) -> Result<pb::NodeExpandVolumeResponse, tonic::Status> {
        let c = &self.csi;
        let req = pb::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (mib * MIB) as i64,
                limit_bytes: 0,
            }),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: capability(kind, Mode::SingleNodeWriter).ok(),
            secrets: HashMap::new(),
        };
        c.call(c.node.clone().node_expand_volume(req))
    }

    fn stats(&self, id: &str, path: &Path) -> Checked<pb::NodeGetVolumeStatsResponse> {
        let c = &self.csi;
        let req = pb::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: String::new(),
        };
        ok(
            "NodeGetVolumeStats",
            c.call(c.node.clone().node_get_volume_stats(req)),
        )
    }

    fn validate(
        &self,
        id: &str,
        kind: &str,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, tonic::Status> {
        let c = &self.csi;
        let req = pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: capability(kind, Mode::SingleNodeWriter)
                .into_iter()
                .collect(),
            ..Default::default()
        };
        c.call(c.controller.clone().validate_volume_capabilities(req))
    }
}

/// The device a volume is mapped as on this host, from its record.
fn mapped_device(name: &str) -> Option<String> {
    netblk::state::list(&netblk::state::state_dir())
        .into_iter()
        .flatten()
        .find(|r| r.volume == name)
        .map(|r| format!("/dev/ublkb{}", r.id))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes `data` at `offset` of `path` (a device or a file), durably.
fn write_at(path: &Path, offset: u64, data: &[u8]) -> Checked {
    let mut file = OpenOptions::new()
        .write(true)
        .create(!path.starts_with("/dev"))
        .truncate(false)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(data))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Reads `len` bytes at `offset` of `path`.
fn read_at(path: &Path, offset: u64, len: usize) -> Checked<Vec<u8>> {
    let mut file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut buf))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(buf)
}

fn block_size(path: &Path) -> Checked<u64> {
    let mut file = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    file.seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", path.display()))
}

/// One volume through its whole life as `kind`.
fn lifecycle(driver: &Driver, nodes: &str, kind: &str, root: &Path) -> Checked {
    let name = format!("pvc-life-{kind}");
    let staging = root.join("staging").join(&name);
    let target = root.join("pods/a/volumes").join(&name);
    let target_ro = root.join("pods/b/volumes").join(&name);
    let data_path = |t: &Path| {
        if kind == "block" {
            t.to_path_buf()
        } else {
            t.join("data")
        }
    };

    let volume = driver.create(&name, BASE, nodes)?;
    let again = driver.create(&name, BASE, nodes)?;
    check(
        again == volume,
        format!("CreateVolume twice differs: {volume:?} / {again:?}"),
    )?;
    check(
        volume.capacity_bytes == (BASE * MIB) as i64,
        format!("capacity {BASE} MiB"),
    )?;
    let id = volume.volume_id.clone();
    let confirmed = ok("ValidateVolumeCapabilities", driver.validate(&id, kind))?;
    check(
        confirmed.confirmed.is_some(),
        format!("not confirmed: {}", confirmed.message),
    )?;

    // Stage and publish, each twice; a second pod read-only.
    for _ in 0..2 {
        driver.stage(&volume, &staging, kind)?;
    }
    let dev = mapped_device(&name).ok_or("staged, but no device is mapped")?;
    for _ in 0..2 {
        driver.publish(&volume, &staging, &target, kind, false)?;
        driver.publish(&volume, &staging, &target_ro, kind, true)?;
    }
    let first = pattern(1, 4 * MIB as usize);
    let at = if kind == "block" { 8 * MIB } else { 0 };
    write_at(&data_path(&target), at, &first)?;
    check(
        read_at(&data_path(&target), at, first.len())? == first,
        "read back through the pod's target",
    )?;
    check(
        read_at(&data_path(&target_ro), at, first.len())? == first,
        "read back through the read-only target",
    )?;
    // A read-only filesystem target refuses writes. (A device node's mount
    // flags do not govern opening the device: for a read-only raw block
    // volume the container runtime grants the pod read access only.)
    if kind != "block" {
        let denied = OpenOptions::new().write(true).open(data_path(&target_ro));
        if !matches!(&denied, Err(e) if e.raw_os_error() == Some(libc::EROFS)) {
            return Err(format!("a read-only target took a write: {denied:?}"));
        }
    }
    let stats = driver.stats(&id, &target)?;
    let total = stats.usage.first().map_or(0, |u| u.total) as u64;
    if kind == "block" {
        check(total == BASE * MIB, format!("block stats total {total}"))?;
    } else {
        check(
            total > BASE * MIB / 2 && total <= BASE * MIB,
            format!("filesystem stats total {total}"),
        )?;
        check(stats.usage.len() == 2, "bytes and inodes")?;
    }
    check(
        stats.volume_condition.as_ref().is_some_and(|c| !c.abnormal),
        format!("volume condition {:?}", stats.volume_condition),
    )?;

    // Unpublish and unstage, each twice: the device is gone.
    for _ in 0..2 {
        driver.unpublish(&id, &target)?;
        driver.unpublish(&id, &target_ro)?;
    }
    check(!target.exists(), "the target is removed")?;
    for _ in 0..2 {
        driver.unstage(&id, &staging)?;
    }
    check(mapped_device(&name).is_none(), "unstaged, but still mapped")?;
    check(!Path::new(&dev).exists(), format!("{dev} still exists"))?;

    // Staged again: the data is there.
    driver.stage(&volume, &staging, kind)?;
    driver.publish(&volume, &staging, &target, kind, false)?;
    check(
        read_at(&data_path(&target), at, first.len())? == first,
        "data after unstage and stage again",
    )?;

    // Expansion: the controller grows the nodes, the node the device and
    // the filesystem; twice each.
    for _ in 0..2 {
        let grown = driver.controller_expand(&id, GROWN)?;
        check(
            grown.capacity_bytes == (GROWN * MIB) as i64 && grown.node_expansion_required,
            format!("ControllerExpandVolume: {grown:?}"),
        )?;
    }
    let online = std::env::var("NETBLK_ONLINE_RESIZE").as_deref() != Ok("0");
    if !online {
        // No UBLK_F_UPDATE_SIZE: a clear error; staging again maps the
        // volume at its new size, and the filesystem grows then.
        let why = fails_with(
            "NodeExpandVolume without UPDATE_SIZE",
            Code::FailedPrecondition,
            driver.node_expand(&id, &target, &staging, kind, GROWN),
        )?;
        check(why.contains("UPDATE_SIZE"), format!("unclear: {why}"))?;
        driver.unpublish(&id, &target)?;
        driver.unstage(&id, &staging)?;
        driver.stage(&volume, &staging, kind)?;
        driver.publish(&volume, &staging, &target, kind, false)?;
    }
    for _ in 0..2 {
        let expanded = ok(
            "NodeExpandVolume",
            driver.node_expand(&id, &target, &staging, kind, GROWN),
        )?;
        check(
            expanded.capacity_bytes == (GROWN * MIB) as i64,
            format!("NodeExpandVolume: {expanded:?}"),
        )?;
    }
    let dev = mapped_device(&name).ok_or("no device after the expansion")?;
    check(
        block_size(Path::new(&dev))? == GROWN * MIB,
        "the device did not grow",
    )?;
    let second = pattern(2, 4 * MIB as usize);
    if kind == "block" {
        write_at(&target, (GROWN - 8) * MIB, &second)?;
        check(
            read_at(&target, (GROWN - 8) * MIB, second.len())? == second,
            "data in the new space",
        )?;
    } else {
        let total = driver
            .stats(&id, &target)?
            .usage
            .first()
            .map_or(0, |u| u.total) as u64;
        check(
            total > BASE * MIB,
            format!("the filesystem did not grow: {total}"),
        )?;
        write_at(&target.join("new"), 0, &second)?;
    }
    check(
        read_at(&data_path(&target), at, first.len())? == first,
        "old data after the expansion",
    )?;

    // Done with it: unpublish, unstage, delete, each twice.
    for _ in 0..2 {
        driver.unpublish(&id, &target)?;
    }
    for _ in 0..2 {
        driver.unstage(&id, &staging)?;
    }
    for _ in 0..2 {
        driver.delete(&id)?;
    }
    fails_with(
        "Validate a deleted volume",
        Code::NotFound,
        driver.validate(&id, kind),
    )?;
    let c = &driver.csi;
    let req = pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(capability(kind, Mode::SingleNodeWriter)?),
        ..Default::default()
    };
    fails_with(
        "Stage a deleted volume",
        Code::NotFound,
        c.call(c.node.clone().node_stage_volume(req)),
    )?;
    println!(
        "csi: {kind}: create, stage, publish (rw and ro), write, stats, unpublish, unstage, stage again (data intact), expand {BASE} -> {GROWN} MiB{}, delete: every call twice",
        if online {
            " online"
        } else {
            " (restaged: no UPDATE_SIZE)"
        }
    );
    Ok(())
}

/// Calls a CO must get errors for.
fn bad_arguments(driver: &Driver, nodes: &str, root: &Path) -> Checked {
    let c = &driver.csi;
    let volume = driver.create("pvc-args", 16, nodes)?;
    let staging = root.join("staging/pvc-args");
    let target = root.join("pods/c/volumes/pvc-args");
    let publish = pb::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(capability("ext4", Mode::SingleNodeWriter)?),
        ..Default::default()
    };
    fails_with(
        "Publish before stage",
        Code::FailedPrecondition,
        c.call(c.node.clone().node_publish_volume(publish)),
    )?;
    let mut other = volume.clone();
    other.volume_id = volume.volume_id.replacen("pvc-args", "pvc-never-made", 1);
    let stage = pb::NodeStageVolumeRequest {
        volume_id: other.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(capability("ext4", Mode::SingleNodeWriter)?),
        ..Default::default()
    };
    fails_with(
        "Stage a volume that does not exist",
        Code::NotFound,
        c.call(c.node.clone().node_stage_volume(stage)),
    )?;
    // An ext4 volume staged, then staged as xfs: not formatted over.
    driver.stage(&volume, &staging, "ext4")?;
    driver.unstage(&volume.volume_id, &staging)?;
    let xfs = pb::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(capability("xfs", Mode::SingleNodeWriter)?),
        ..Default::default()
    };
    let why = fails_with(
        "Stage an ext4 volume as xfs",
        Code::FailedPrecondition,
        c.call(c.node.clone().node_stage_volume(xfs)),
    )?;
    check(why.contains("holds ext4"), format!("unclear: {why}"))?;
    driver.unstage(&volume.volume_id, &staging)?;
    check(
        mapped_device("pvc-args").is_none(),
        "still mapped after a refused stage and unstage",
    )?;
    driver.delete(&volume.volume_id)?;
    println!(
        "csi: publish before stage, stage of a missing volume, ext4 staged as xfs: refused with the spec's codes"
    );
    Ok(())
}

/// What a stage is refused with (FAILED_PRECONDITION), and that it leaves
/// no device mapped once unstaged.
fn stage_refused(driver: &Driver, volume: &pb::Volume, staging: &Path, why: &str) -> Checked {
    let c = &driver.csi;
    let req = pb::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(capability("ext4", Mode::SingleNodeWriter)?),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let got = c.call(c.node.clone().node_stage_volume(req));
    let message = match got {
        Err(status)
            if status.code() == Code::FailedPrecondition || status.code() == Code::Internal =>
        {
            status.message().to_string()
        }
        other => return Err(format!("stage ({why}): expected a refusal, got {other:?}")),
    };
    check(
        message.contains(why),
        format!("stage refused without '{why}': {message}"),
    )?;
    driver.unstage(&volume.volume_id, staging)?;
    let name = volume.volume_id.split('/').next().unwrap_or_default();
    check(
        mapped_device(name).is_none(),
        format!("{name}: still mapped after a refused stage and unstage"),
    )
}

/// Node `node` of `nodes` loses volume `name` and makes an empty one in
/// its place (a node whose disk was replaced, under an older netblk).
fn lose_volume(nodes: &str, node: usize, name: &str, bytes: u64) -> Checked {
    use netblk::net::{self, Identity, Open};
    let addrs: Vec<std::net::SocketAddr> = nodes
        .split(',')
        .map(|n| n.parse().map_err(|_| format!("bad node '{n}'")))
        .collect::<Result<_, _>>()?;
    let addr = *addrs.get(node).ok_or("no such node")?;
    let layout =
        netblk::layout::Layout::new(bytes, 65536, addrs.len() as u32).map_err(|e| e.to_string())?;
    let who = Identity {
        owner_epoch: 0,
        client_id: "csi-check-loser",
        volume: name,
        session: net::clock_session(),
        volume_id: None,
        digest: false,
        tls: None,
    };
    let timeouts = netblk_csi::controller::NODE_TIMEOUTS;
    let (stream, _) = net::connect_as(addr, node, &layout, &who, timeouts, Open::Existing)
        .map_err(|e| e.to_string())?;
    let op = netblk_protocol::pb::request::Op::Delete(netblk_protocol::pb::Delete {});
    let reply = net::call(&stream, 1, op, timeouts.io)?;
    check(
        reply.status == netblk_protocol::pb::Status::Ok as i32,
        format!("delete: {}", reply.message),
    )?;
    drop(stream);
    net::connect(addr, node, &layout, &who, timeouts)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Only a volume the controller made for a filesystem and that never had
/// one is formatted: not one whose context pins no identities (an older
/// controller's), not one made for block access, and a node that lost
/// the volume is refused (named) instead of being read as zeroes.
fn formatting(driver: &Driver, nodes: &str, root: &Path) -> Checked {
    let staging = root.join("staging/pvc-format");
    let mut old = driver.create("pvc-old", 16, nodes)?;
    old.volume_context = HashMap::from([("queues".to_string(), "2".to_string())]);
    stage_refused(driver, &old, &staging, "older netblk-csi controller")?;
    driver.delete(&old.volume_id)?;
    let raw = driver.create_as("pvc-raw", 16, nodes, "block")?;
    stage_refused(driver, &raw, &staging, "created for block access")?;
    driver.delete(&raw.volume_id)?;
    let lost = driver.create("pvc-lost", 16, nodes)?;
    driver.stage(&lost, &staging, "ext4")?;
    driver.unstage(&lost.volume_id, &staging)?;
    lose_volume(nodes, 0, "pvc-lost", 16 * MIB)?;
    stage_refused(driver, &lost, &staging, "node 0")?;
    driver.delete(&lost.volume_id)?;
    println!(
        "csi: formatting: an older controller's volume and a block volume are not formatted; a node that lost the volume (made anew, empty) is refused at NodeStage, named"
    );
    Ok(())
}

fn wait_ready(csi: &Csi) -> Checked {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = csi
            .call(csi.identity.clone().probe(pb::ProbeRequest {}))
            .map(|p| p.ready == Some(true));
        if matches!(ready, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after 180 s: {ready:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn connect(socket: &str) -> Checked<Csi> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Csi::connect(Path::new(socket)) {
            Ok(csi) => return Ok(csi),
            Err(why) if Instant::now() > deadline => return Err(why),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn run(args: &[String]) -> Checked {
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {i}; see the source's usage"))
    };
    let driver = Driver {
        csi: connect(arg(0)?)?,
    };
    let path = |i: usize| arg(i).map(PathBuf::from);
    let volume_of = |id: &str| pb::Volume {
        volume_id: id.into(),
        volume_context: HashMap::from([("queues".to_string(), "2".to_string())]),
        ..Default::default()
    };
    match arg(1)? {
        "lifecycle" => {
            let nodes = arg(2)?;
            wait_ready(&driver.csi)?;
            let root = PathBuf::from("/var/lib/kubelet/csi-check");
            for kind in ["block", "ext4", "xfs"] {
                lifecycle(&driver, nodes, kind, &root)?;
            }
            bad_arguments(&driver, nodes, &root)
        }
        "formatting" => formatting(&driver, arg(2)?, Path::new("/var/lib/kubelet/csi-check")),
        "wait-ready" => wait_ready(&driver.csi),
        "create" => {
            let mib = arg(3)?.parse().map_err(|_| "MIB is a number".to_string())?;
            let volume = driver.create(arg(2)?, mib, arg(4)?)?;
            let mut context: Vec<String> = volume
                .volume_context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            context.sort();
            println!("{} {}", volume.volume_id, context.join(";"));
            Ok(())
        }
        "stage" => {
            let mut volume = volume_of(arg(2)?);
            if let Ok(context) = arg(5) {
                volume.volume_context = context
                    .split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            }
            driver.stage(&volume, &path(3)?, arg(4)?)
        }
        "publish" => driver.publish(&volume_of(arg(2)?), &path(3)?, &path(4)?, arg(5)?, false),
        "unpublish" => driver.unpublish(arg(2)?, &path(3)?),
        "unstage" => driver.unstage(arg(2)?, &path(3)?),
        "delete" => driver.delete(arg(2)?),
        other => Err(format!("unknown command '{other}'")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("netblk-csi-check: {why}");
            ExitCode::FAILURE
        }
    }
}

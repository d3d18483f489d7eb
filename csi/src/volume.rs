//! What the controller and node services agree on about a volume, as pure
//! functions: the volume id (everything DeleteVolume and the node need,
//! since CSI passes nothing else), StorageClass parameters, capacity
//! rounding, and which capabilities netblk serves.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::pb;
use crate::pb::volume_capability::access_mode::Mode;

/// Sizes are whole MiB: a multiple of every block size and stripe unit
/// up to 1 MiB.
pub const SIZE_STEP: u64 = 1 << 20;
/// The size of a volume asked for without a capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The stripe unit when the StorageClass names none.
pub const DEFAULT_STRIPE_UNIT: u32 = 128 << 10;

/// A volume as its id names it: `NAME/STRIPE_UNIT/NODE,NODE,...`, and
/// `/REPLICAS` after that for a replicated volume (volume names cannot
/// contain `/`). A volume placed over a pool has `pool=POOL` where the
/// nodes would be: its nodes are what its placement record names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeHandle {
    pub name: String,
    pub stripe_unit: u32,
    /// Its nodes in stripe order (empty for a pool's volume).
    pub nodes: Vec<SocketAddr>,
    pub replicas: u32,
    /// The pool it was placed over (`POOL_DIR/POOL.toml`).
    pub pool: Option<String>,
}

impl VolumeHandle {
    pub fn id(&self) -> String {
        let place = match &self.pool {
            Some(pool) => format!("{POOL_PREFIX}{pool}"),
            None => {
                let nodes: Vec<String> = self.nodes.iter().map(ToString::to_string).collect();
                nodes.join(",")
            }
        };
        let id = format!("{}/{}/{place}", self.name, self.stripe_unit);
        if self.replicas > 1 {
            format!("{id}/{}", self.replicas)
        } else {
            id
        }
    }

    /// Parses a volume id; the error says what is wrong (for
    /// INVALID_ARGUMENT, or NOT_FOUND where the spec asks for it).
    pub fn parse(id: &str) -> Result<VolumeHandle, String> {
        let mut parts = id.splitn(4, '/');
        let (Some(name), Some(unit), Some(place)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("volume id '{id}' is not NAME/STRIPE_UNIT/NODES"));
        };
        let replicas = match parts.next() {
            None => 1,
            Some(r) => r
                .parse::<u32>()
                .ok()
                .filter(|r| (2..=netblk_protocol::geometry::MAX_REPLICAS).contains(r))
                .ok_or_else(|| format!("volume id '{id}': bad replica count '{r}'"))?,
        };
        if name.is_empty() {
            return Err(format!("volume id '{id}' has no name"));
        }
        let stripe_unit = unit
            .parse()
            .map_err(|_| format!("volume id '{id}': bad stripe unit '{unit}'"))?;
        if let Some(pool) = place.strip_prefix(POOL_PREFIX) {
            check_pool_name(pool).map_err(|why| format!("volume id '{id}': {why}"))?;
            return Ok(VolumeHandle {
                name: name.to_string(),
                stripe_unit,
                nodes: Vec::new(),
                replicas,
                pool: Some(pool.to_string()),
            });
        }
        let nodes = parse_nodes(place).map_err(|why| format!("volume id '{id}': {why}"))?;
        if nodes.len() % replicas as usize != 0 {
            return Err(format!(
                "volume id '{id}': {} nodes do not hold {replicas} replicas of every column",
                nodes.len()
            ));
        }
        Ok(VolumeHandle {
            name: name.to_string(),
            stripe_unit,
            nodes,
            replicas,
            pool: None,
        })
    }
}

/// What stands for the nodes in the id of a volume placed over a pool.
const POOL_PREFIX: &str = "pool=";

/// A pool's name: a file name in the pool directory, so letters, digits,
/// `-`, `_` and `.` (not first), at most 63.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pool name '{name}' is not 1 to 63 letters, digits, '-', '_' or '.' (not first)"
        ))
    }
}

impl VolumeHandle {
    /// The volume as `netblk::manage` names it on its nodes, reached with
    /// the plugin's TLS (if it was given any). Not for a pool's volume,
    /// whose nodes are read from its records
    /// ([`crate::pools::Pools::volume_ref`]).
    pub fn volume_ref(&self, tls: Option<&Tls>) -> netblk::manage::VolumeRef {
        netblk::manage::VolumeRef {
            name: self.name.clone(),
            stripe_unit: self.stripe_unit,
            nodes: self.nodes.clone(),
            replicas: self.replicas,
            tls: tls.cloned(),
        }
    }
}

/// Mutual TLS to the storage nodes: the plugin's CA, certificate and key
/// (`--tls-ca`, `--tls-cert`, `--tls-key`: files of a mounted Secret),
/// read again when they change.
pub type Tls = std::sync::Arc<netblk::net::ClientTls>;

/// The plugin's TLS from its three files (all or none): checked now, so
/// that unusable files stop the plugin at start.
pub fn tls(
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
) -> Result<Option<Tls>, String> {
    match (ca, cert, key) {
        (None, None, None) => Ok(None),
        (Some(ca), Some(cert), Some(key)) => {
            netblk_tls::config::Reloading::client(netblk_tls::config::ClientFiles {
                ca,
                cert,
                key,
                danger_skip_server_name: false,
            })
            .map(|t| Some(std::sync::Arc::new(t)))
            .map_err(|why| format!("TLS: {why}"))
        }
        _ => Err("--tls-ca, --tls-cert and --tls-key go together".into()),
    }
}

/// The handle of a request's volume id: INVALID_ARGUMENT if it is empty,
/// NOT_FOUND if it is not one of ours. A lookup: called only once every
/// other argument of the request was checked (a request missing one is
/// INVALID_ARGUMENT, whatever its id).
pub fn handle_of(id: &str) -> Result<VolumeHandle, tonic::Status> {
    if id.is_empty() {
        return Err(tonic::Status::invalid_argument("volume_id is empty"));
    }
    VolumeHandle::parse(id).map_err(tonic::Status::not_found)
}

/// Queues per mapped device, from `text` (`what` names where it came
/// from): 1 to 64, 1 when absent.
pub fn queues(text: Option<&String>, what: &str) -> Result<usize, String> {
    match text {
        None => Ok(1),
        Some(q) => q
            .parse::<usize>()
            .ok()
            .filter(|q| (1..=64).contains(q))
            .ok_or_else(|| format!("{what} {q} is not from 1 to 64")),
    }
}

/// The volume context: what the controller says of a volume at
/// CreateVolume, which Kubernetes keeps with it (the PersistentVolume) and
/// hands to every NodeStage.
///
/// Whether NodeStage may format a volume is decided from it. A volume may
/// be formatted only if it was never given a filesystem, and the node
/// cannot tell that from zeroes alone: a node that lost the volume and
/// made an empty one in its place reads back zeroes where the data was,
/// and a raw block volume may be zero wherever a signature would sit. So:
/// - `volumeIds` pins, for every node, the volume identity the node stated
///   when the controller created (or found) the volume. The node plugin
///   maps with them (`netblk map --volume-ids`), so every byte it reads
///   was written to that very volume since its creation: a node that lost
///   it is refused, never read as zeroes.
/// - `createdFor` is `filesystem` when every capability CreateVolume was
///   asked for was a mount: the volume is never used as a raw device, so
///   whatever was written to it was written by a filesystem, which starts
///   with `mkfs` writing its signatures where [`crate::host::probe`] reads.
///
/// Hence a blank device (no signature in its first and last MiB) with both
/// keys was never formatted: none of its stages got past `mkfs`, and none
/// of its data is lost. Only then does NodeStage format it. A context
/// without them (a volume made by an older controller, or created for
/// block access) is mapped and mounted as before, but never formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// Queues per mapped device.
    pub queues: usize,
    /// Each node's volume identity at creation, in node order (None: an
    /// older controller made the volume).
    pub volume_ids: Option<Vec<String>>,
    /// Created for filesystems only (never a raw device).
    pub filesystem_only: bool,
}

/// The context keys.
const QUEUES: &str = "queues";
const VOLUME_IDS: &str = "volumeIds";
const CREATED_FOR: &str = "createdFor";

impl Context {
    /// The context of a volume the controller created with `queues` and
    /// `capabilities`, whose nodes state `volume_ids`.
    pub fn created(
        queues: usize,
        volume_ids: Vec<String>,
        capabilities: &[pb::VolumeCapability],
    ) -> Context {
        use pb::volume_capability::AccessType;
        Context {
            queues,
            volume_ids: Some(volume_ids),
            filesystem_only: capabilities
                .iter()
                .all(|c| matches!(c.access_type, Some(AccessType::Mount(_)))),
        }
    }

    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([(QUEUES.to_string(), self.queues.to_string())]);
        if let Some(ids) = &self.volume_ids {
            map.insert(VOLUME_IDS.into(), ids.join(","));
            let created_for = if self.filesystem_only {
                "filesystem"
            } else {
                "block"
            };
            map.insert(CREATED_FOR.into(), created_for.into());
        }
        map
    }

    /// A NodeStage request's context; the error names the key
    /// (INVALID_ARGUMENT). Other keys are left alone. Whether it fits the
    /// volume's nodes is [`Context::fits`].
    pub fn parse(map: &HashMap<String, String>) -> Result<Context, String> {
        let queues = queues(map.get(QUEUES), "volume context 'queues'")?;
        let volume_ids = match map.get(VOLUME_IDS) {
            None => None,
            Some(text) => {
                let ids: Vec<String> = text.split(',').map(str::to_string).collect();
                Context::check_ids(&ids, ids.len())?;
                Some(ids)
            }
        };
        let filesystem_only = match map.get(CREATED_FOR).map(String::as_str) {
            None | Some("block") => false,
            Some("filesystem") => true,
            Some(other) => {
                return Err(format!(
                    "volume context '{CREATED_FOR}' is '{other}', not filesystem or block"
                ));
            }
        };
        Ok(Context {
            queues,
            volume_ids,
            filesystem_only,
        })
    }

    /// Whether the context fits a volume over `nodes` nodes (one identity
    /// per node, if it has them).
    pub fn fits(&self, nodes: usize) -> Result<(), String> {
        match &self.volume_ids {
            Some(ids) => Context::check_ids(ids, nodes),
            None => Ok(()),
        }
    }

    fn check_ids(ids: &[String], nodes: usize) -> Result<(), String> {
        netblk::frontend::check_volume_ids(ids, nodes)
            .map_err(|why| format!("volume context '{VOLUME_IDS}': {why}"))
    }

    /// Whether a blank device of this volume may be formatted (see the
    /// type's documentation); the error says why not.
    pub fn may_format(&self) -> Result<(), String> {
        if self.volume_ids.is_none() {
            return Err("its volume context pins no volume identities (made by an older netblk-csi controller): it may be a volume whose node lost its data".into());
        }
        if !self.filesystem_only {
            return Err(
                "it was created for block access: zeroes where a signature would be may be data"
                    .into(),
            );
        }
        Ok(())
    }
}

fn parse_nodes(text: &str) -> Result<Vec<SocketAddr>, String> {
    let nodes: Vec<SocketAddr> = text
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .map_err(|_| format!("'{n}' is not a node address IP:PORT"))
        })
        .collect::<Result<_, _>>()?;
    if nodes.is_empty() {
        return Err("no nodes".into());
    }
    Ok(nodes)
}

/// What a StorageClass says: `nodes` (`IP:PORT,...` in stripe order) or
/// `pool` (a pool file's name in the plugin's pool directory: volumes are
/// placed on it), one of them required; `stripeUnit` (bytes, a power of
/// two; default 128 KiB), `queues` (per mapped device, 1 to 64; default
/// 1), `replicas` (copies of every column, 1 to 5, the nodes then being
/// columns × replicas row by row; default 1); with a pool, `columns`
/// (default 1) and `spread` (zone, rack or host: the level replicas of a
/// column are kept apart at; default host). Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    pub nodes: Vec<SocketAddr>,
    pub stripe_unit: u32,
    pub queues: usize,
    pub replicas: u32,
    /// Placement over a pool instead of `nodes`.
    pub pool: Option<PoolParameters>,
}

/// A StorageClass's placement over a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolParameters {
    pub name: String,
    pub columns: u32,
    pub spread: netblk::pool::Level,
}

const PARAMETERS: [&str; 7] = [
    "nodes",
    "pool",
    "stripeUnit",
    "queues",
    "replicas",
    "columns",
    "spread",
];

impl Parameters {
    pub fn parse(params: &HashMap<String, String>) -> Result<Parameters, String> {
        if let Some(key) = params.keys().find(|k| !PARAMETERS.contains(&k.as_str())) {
            return Err(format!(
                "unknown parameter '{key}' (netblk takes {})",
                PARAMETERS.join(", ")
            ));
        }
        let pool = match (params.get("pool"), params.get("nodes")) {
            (Some(_), Some(_)) => {
                return Err("parameters 'pool' and 'nodes' exclude each other".into());
            }
            (None, None) => {
                return Err(
                    "parameter 'nodes' (IP:PORT,...) or 'pool' (a pool's name) is required".into(),
                );
            }
            (Some(name), None) => {
                check_pool_name(name).map_err(|why| format!("parameter 'pool': {why}"))?;
                let columns = match params.get("columns") {
                    None => 1,
                    Some(c) => c
                        .parse::<u32>()
                        .ok()
                        .filter(|c| (1..=1024).contains(c))
                        .ok_or_else(|| format!("parameter 'columns' {c} is not from 1 to 1024"))?,
                };
                let spread = match params.get("spread") {
                    None => netblk::pool::Level::Host,
                    Some(s) => netblk::pool::Level::parse(s)
                        .map_err(|why| format!("parameter 'spread': {why}"))?,
                };
                Some(PoolParameters {
                    name: name.clone(),
                    columns,
                    spread,
                })
            }
            (None, Some(_)) => {
                if let Some(key) = ["columns", "spread"]
                    .iter()
                    .find(|k| params.contains_key(**k))
                {
                    return Err(format!("parameter '{key}' goes with 'pool' only"));
                }
                None
            }
        };
        let nodes = match params.get("nodes") {
            None => Vec::new(),
            Some(n) => parse_nodes(n).map_err(|why| format!("parameter 'nodes': {why}"))?,
        };
        let stripe_unit = match params.get("stripeUnit") {
            None => DEFAULT_STRIPE_UNIT,
            Some(s) => s
                .parse::<u32>()
                .ok()
                .filter(|u| u.is_power_of_two() && (4096..=(4 << 20)).contains(u))
                .ok_or_else(|| {
                    format!("parameter 'stripeUnit' {s} is not a power of two from 4096 to 4194304")
                })?,
        };
        let queues = queues(params.get("queues"), "parameter 'queues'")?;
        let max = netblk_protocol::geometry::MAX_REPLICAS;
        let replicas = match params.get("replicas") {
            None => 1,
            Some(r) => r
                .parse::<u32>()
                .ok()
                .filter(|r| (1..=max).contains(r))
                .ok_or_else(|| format!("parameter 'replicas' {r} is not from 1 to {max}"))?,
        };
        if nodes.len() % replicas as usize != 0 {
            return Err(format!(
                "parameter 'nodes' lists {} nodes, not a multiple of replicas {replicas} (columns × replicas, row by row)",
                nodes.len()
            ));
        }
        Ok(Parameters {
            nodes,
            stripe_unit,
            queues,
            replicas,
            pool,
        })
    }
}

/// The size to make for `range`: at least `required_bytes` (default 1 GiB),
/// rounded up to whole MiB; an error (OUT_OF_RANGE) when that exceeds a
/// `limit_bytes`, or either is negative.
pub fn capacity(range: Option<&pb::CapacityRange>) -> Result<u64, String> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let (Ok(required), Ok(limit)) = (u64::try_from(required), u64::try_from(limit)) else {
        return Err("capacity bytes must not be negative".into());
    };
    let wanted = if required == 0 {
        if limit == 0 {
            DEFAULT_SIZE
        } else {
            DEFAULT_SIZE.min(limit)
        }
    } else {
        required
    };
    let size = wanted
        .checked_next_multiple_of(SIZE_STEP)
        .ok_or_else(|| format!("{wanted} bytes is too large"))?;
    if limit != 0 && size > limit {
        return Err(format!(
            "{size} bytes (whole MiB) is above the limit of {limit} bytes"
        ));
    }
    if size == 0 {
        return Err("a limit below 1 MiB cannot be met".into());
    }
    Ok(size)
}

/// Whether netblk serves `capability`: a block device or a filesystem
/// (ext4 or xfs, or unspecified), used from one node at a time (netblk
/// has no cluster locking: a second writer would corrupt the volume).
pub fn supported(capability: &pb::VolumeCapability) -> Result<(), String> {
    use pb::volume_capability::AccessType;
    match &capability.access_type {
        Some(AccessType::Block(_)) => {}
        Some(AccessType::Mount(mount)) => {
            if !["", "ext4", "xfs"].contains(&mount.fs_type.as_str()) {
                return Err(format!(
                    "filesystem '{}' is not supported (ext4 or xfs)",
                    mount.fs_type
                ));
            }
        }
        None => return Err("a volume capability needs block or mount access".into()),
    }
    let mode = capability
        .access_mode
        .as_ref()
        .map(|m| m.mode)
        .and_then(|m| Mode::try_from(m).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        Mode::Unknown => Err("a volume capability needs an access mode".into()),
        other => Err(format!(
            "access mode {} is not supported: a netblk volume is used from one node at a time",
            other.as_str_name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn cap(access: AccessType, mode: Mode) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn a_volume_id_carries_name_stripe_unit_and_nodes() {
        let handle = VolumeHandle {
            name: "pvc-0a1b".into(),
            stripe_unit: 65536,
            nodes: vec![
                "10.0.0.1:7001".parse().expect("addr"),
                "[fd00::2]:7001".parse().expect("addr"),
            ],
            replicas: 1,
            pool: None,
        };
        let id = handle.id();
        assert_eq!(id, "pvc-0a1b/65536/10.0.0.1:7001,[fd00::2]:7001");
        assert_eq!(VolumeHandle::parse(&id), Ok(handle.clone()));
        // A replicated volume says how many copies, after the nodes.
        let replicated = VolumeHandle {
            replicas: 2,
            ..handle
        };
        let id = replicated.id();
        assert_eq!(id, "pvc-0a1b/65536/10.0.0.1:7001,[fd00::2]:7001/2");
        assert_eq!(VolumeHandle::parse(&id), Ok(replicated.clone()));
        assert!(VolumeHandle::parse("pvc/65536/10.0.0.1:1,10.0.0.2:1,10.0.0.3:1/2").is_err());
        assert!(VolumeHandle::parse("pvc/65536/10.0.0.1:1,10.0.0.2:1/9").is_err());
        // A pool's volume names its pool where the nodes would be.
        let pooled = VolumeHandle {
            nodes: Vec::new(),
            pool: Some("rack-7".into()),
            ..replicated
        };
        let id = pooled.id();
        assert_eq!(id, "pvc-0a1b/65536/pool=rack-7/2");
        assert_eq!(VolumeHandle::parse(&id), Ok(pooled));
        for bad in [
            "",
            "pvc",
            "pvc/x/10.0.0.1:1",
            "/65536/10.0.0.1:1",
            "pvc/65536/",
            "pvc/65536/host",
            "pvc/65536/pool=",
            "pvc/65536/pool=../etc",
            "pvc/65536/pool=.hidden",
        ] {
            assert!(VolumeHandle::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_context_pins_identities_and_allows_formatting_only_a_filesystem_volume() {
        let ids = vec!["0a".to_string(), "0b".into()];
        let mount = cap(
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                mount_flags: Vec::new(),
                volume_mount_group: String::new(),
            }),
            Mode::SingleNodeWriter,
        );
        let block = cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter);
        let made = Context::created(2, ids.clone(), std::slice::from_ref(&mount));
        let map = made.to_map();
        assert_eq!(map.get("volumeIds").map(String::as_str), Some("0a,0b"));
        let back = Context::parse(&map).expect("parses");
        assert_eq!(back, made);
        assert_eq!(back.fits(2), Ok(()));
        assert_eq!(back.may_format(), Ok(()));
        let raw = Context::created(1, ids.clone(), &[mount, block]);
        let back = Context::parse(&raw.to_map()).expect("parses");
        assert!(
            back.may_format()
                .expect_err("block")
                .contains("block access")
        );
        // An older controller's context: mapped as before, never formatted.
        let old = HashMap::from([("queues".to_string(), "2".to_string())]);
        let back = Context::parse(&old).expect("parses");
        assert_eq!(back.volume_ids, None);
        assert_eq!(back.fits(5), Ok(()));
        assert!(back.may_format().expect_err("old").contains("older"));
        // Identities are checked against the volume's nodes.
        let err = made.fits(3).expect_err("count");
        assert!(err.contains("'volumeIds'"), "{err}");
        let mut bad = made.to_map();
        bad.insert("volumeIds".into(), "0a,zz".into());
        assert!(Context::parse(&bad).is_err());
        bad.insert("volumeIds".into(), "0a,0b".into());
        bad.insert("createdFor".into(), "tape".into());
        assert!(Context::parse(&bad).is_err());
    }

    #[test]
    fn parameters_are_checked_and_defaulted() {
        let params = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p =
            Parameters::parse(&params(&[("nodes", "10.0.0.1:7001, 10.0.0.2:7001")])).expect("ok");
        assert_eq!(
            (p.nodes.len(), p.stripe_unit, p.queues),
            (2, DEFAULT_STRIPE_UNIT, 1)
        );
        let p = Parameters::parse(&params(&[
            ("nodes", "10.0.0.1:7001"),
            ("stripeUnit", "65536"),
            ("queues", "4"),
        ]))
        .expect("ok");
        assert_eq!((p.stripe_unit, p.queues), (65536, 4));
        let err = |pairs: &[(&str, &str)]| Parameters::parse(&params(pairs)).expect_err("bad");
        assert!(err(&[]).contains("'nodes'"));
        assert!(err(&[("nodes", "10.0.0.1")]).contains("IP:PORT"));
        assert!(err(&[("nodes", "10.0.0.1:1"), ("stripeUnit", "1000")]).contains("power of two"));
        assert!(err(&[("nodes", "10.0.0.1:1"), ("queues", "0")]).contains("'queues'"));
        assert!(
            err(&[("nodes", "10.0.0.1:1"), ("colour", "3")]).contains("unknown parameter 'colour'")
        );
        assert!(
            err(&[("nodes", "10.0.0.1:1,10.0.0.2:1"), ("replicas", "3")])
                .contains("multiple of replicas 3")
        );
        assert!(err(&[("nodes", "10.0.0.1:1"), ("replicas", "6")]).contains("from 1 to 5"));
        let p = Parameters::parse(&params(&[
            (
                "nodes",
                "10.0.0.1:7001,10.0.0.2:7001,10.0.0.3:7001,10.0.0.4:7001",
            ),
            ("replicas", "2"),
        ]))
        .expect("ok");
        assert_eq!(p.replicas, 2);
        // A pool instead of nodes, with its columns and spread.
        let p = Parameters::parse(&params(&[
            ("pool", "fast"),
            ("columns", "3"),
            ("replicas", "2"),
            ("spread", "zone"),
        ]))
        .expect("ok");
        assert_eq!(
            p.pool,
            Some(PoolParameters {
                name: "fast".into(),
                columns: 3,
                spread: netblk::pool::Level::Zone,
            })
        );
        assert!(p.nodes.is_empty());
        let p = Parameters::parse(&params(&[("pool", "fast")])).expect("ok");
        assert_eq!(
            p.pool.map(|p| (p.columns, p.spread)),
            Some((1, netblk::pool::Level::Host))
        );
        assert!(err(&[("pool", "a"), ("nodes", "10.0.0.1:1")]).contains("exclude each other"));
        assert!(err(&[]).contains("'nodes' (IP:PORT,...) or 'pool'"));
        assert!(err(&[("nodes", "10.0.0.1:1"), ("columns", "2")]).contains("with 'pool' only"));
        assert!(err(&[("pool", "a/b")]).contains("parameter 'pool'"));
        assert!(err(&[("pool", "a"), ("spread", "row")]).contains("parameter 'spread'"));
        assert!(err(&[("pool", "a"), ("columns", "0")]).contains("'columns' 0"));
    }

    #[test]
    fn capacity_rounds_up_to_whole_mib_within_the_limit() {
        let range = |required, limit| pb::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(capacity(None), Ok(DEFAULT_SIZE));
        assert_eq!(capacity(Some(&range(1, 0))), Ok(SIZE_STEP));
        assert_eq!(capacity(Some(&range(5 << 20, 0))), Ok(5 << 20));
        assert_eq!(capacity(Some(&range((5 << 20) + 1, 0))), Ok(6 << 20));
        assert_eq!(
            capacity(Some(&range(0, 512 << 20))),
            Ok(512 << 20),
            "default capped by the limit"
        );
        assert!(capacity(Some(&range((5 << 20) + 1, 6 << 20))).is_ok());
        assert!(
            capacity(Some(&range((5 << 20) + 1, (5 << 20) + 2))).is_err(),
            "rounding passes the limit"
        );
        assert!(capacity(Some(&range(-1, 0))).is_err());
        assert!(
            capacity(Some(&range(0, 4096))).is_err(),
            "no whole MiB fits"
        );
    }

    #[test]
    fn one_node_at_a_time_block_or_ext4_or_xfs() {
        let block = || AccessType::Block(BlockVolume {});
        let mount = |fs: &str| {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: Vec::new(),
                volume_mount_group: String::new(),
            })
        };
        assert!(supported(&cap(block(), Mode::SingleNodeWriter)).is_ok());
        assert!(supported(&cap(mount("ext4"), Mode::SingleNodeReaderOnly)).is_ok());
        assert!(supported(&cap(mount(""), Mode::SingleNodeSingleWriter)).is_ok());
        assert!(supported(&cap(mount("xfs"), Mode::SingleNodeMultiWriter)).is_ok());
        assert!(supported(&cap(mount("btrfs"), Mode::SingleNodeWriter)).is_err());
        assert!(supported(&cap(block(), Mode::MultiNodeMultiWriter)).is_err());
        assert!(supported(&cap(block(), Mode::MultiNodeReaderOnly)).is_err());
        assert!(supported(&cap(block(), Mode::Unknown)).is_err());
        assert!(
            supported(&pb::VolumeCapability {
                access_type: None,
                access_mode: None
            })
            .is_err()
        );
    }
}

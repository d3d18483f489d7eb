//! What netblk remembers about its devices, one small file per device under
//! the state directory (`$NETBLK_STATE_DIR`, default `/run/netblk`): enough
//! for `netblk list` and `netblk unmap` to work from another process.
//!
//! The directory is private: made with mode 0700; one that exists with
//! looser permissions is tightened to 0700, and one that is a symbolic link,
//! not a directory, or owned by another user is refused. A record is written
//! atomically (a fresh temporary file in the same directory, mode 0600,
//! fsynced, renamed over the record, then the directory fsynced), and read
//! without following symbolic links; a record that is not a regular file of
//! ours, is larger than [`MAX_RECORD_BYTES`], is cut short or is not a
//! netblk record is an error naming the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ledger::NodeDurability;
use crate::ublk::ctrl::effective_uid;

/// The first line of a record: its magic and format version. Version 3
/// added `data_digest` (a version 2 record has none); version 4 the nodes'
/// `durability` (a version 2 or 3 record knows none); version 5 the
/// replicas; version 6 the `resync_rate` (older records: the default).
const MAGIC: &str = "netblk-device 6";
const MAGIC_V5: &str = "netblk-device 5";
const MAGIC_V4: &str = "netblk-device 4";
const MAGIC_V3: &str = "netblk-device 3";
const MAGIC_V2: &str = "netblk-device 2";

/// Largest record read, bytes. A record is a few hundred bytes; anything
/// larger is not one of ours.
pub const MAX_RECORD_BYTES: u64 = 64 << 10;

/// What `list` shows as a device's state, from the kernel's state of the
/// device (`None`: no such device) and whether the daemon of its record
/// still runs. A device whose daemon is gone needs recovery whatever the
/// kernel says while it lets go of the daemon (LIVE first, then QUIESCED),
/// unless the device was stopped (DEAD: nothing to recover; unmap it).
pub fn device_state(kernel_state: Option<u16>, daemon_alive: bool) -> &'static str {
    use crate::ublk::sys;
    match kernel_state {
        None => "gone",
        Some(sys::UBLK_S_DEV_DEAD) => "stopped",
        Some(_) if !daemon_alive => "needs-recovery",
        Some(sys::UBLK_S_DEV_LIVE) => "live",
        Some(sys::UBLK_S_DEV_QUIESCED) => "quiesced",
        Some(sys::UBLK_S_DEV_FAIL_IO) => "failing-io",
        Some(_) => "unknown",
    }
}

/// The state directory.
pub fn state_dir() -> PathBuf {
    std::env::var_os("NETBLK_STATE_DIR").map_or_else(|| PathBuf::from("/run/netblk"), PathBuf::from)
}

/// One mapped device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: u32,
    pub volume: String,
    pub size: u64,
    pub stripe_unit: u32,
    pub nodes: Vec<SocketAddr>,
    pub queues: usize,
    pub depth: u16,
    pub block_size: u32,
    pub data_path: String,
    /// The serving daemon, and when it started (to tell it from a later
    /// process with the same pid).
    pub pid: u32,
    pub pid_start: u64,
    /// What the nodes know this client as (kept across recoveries).
    pub client_id: String,
    /// Bumped by each recovery; sessions of generation `g` start at
    /// `g << 32`, above every session of the daemons before.
    pub generation: u32,
    pub io_timeout_secs: u64,
    pub node_down_timeout_secs: u64,
    /// Copies of every stripe column (records before version 5: 1).
    pub replicas: u32,
    pub replica_timeout_secs: u64,
    /// Bytes a second a catch-up copies at most (0: no limit; a record
    /// without the line: the default).
    pub resync_rate: u64,
    /// `zc` or `copy`.
    pub send: String,
    /// Each node's volume identity, pinned at the first connect (empty:
    /// the next connect pins them).
    pub volume_ids: Vec<String>,
    /// CRC-32C data digests on every payload (a record without the line
    /// has none).
    pub data_digest: bool,
    /// Mutual TLS to the nodes: the files the daemon was given.
    pub tls: Option<netblk_tls::config::ClientFiles>,
    /// Per node, in node order: the last incarnation seen, whether
    /// acknowledged writes not covered by a flush may exist, and whether
    /// the next flush must fail (empty: not known, an older record).
    pub durability: Vec<NodeDurability>,
}

/// `durability` as a record line: `INCARNATION:DIRTY:LOST` per node, the
/// incarnation in hex, the flags 0 or 1.
fn durability_text(nodes: &[NodeDurability]) -> String {
    let one = |d: &NodeDurability| {
        format!(
            "{:x}:{}:{}",
            d.incarnation,
            u8::from(d.dirty),
            u8::from(d.lost)
        )
    };
    nodes.iter().map(one).collect::<Vec<_>>().join(",")
}

fn parse_durability(text: &str, nodes: usize) -> Result<Vec<NodeDurability>, String> {
    let bad = || format!("bad 'durability' value '{text}'");
    let flag = |f: &str| match f {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad()),
    };
    let parsed = text
        .split(',')
        .map(|node| {
            let mut parts = node.split(':');
            let (Some(inc), Some(dirty), Some(lost), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            Ok(NodeDurability {
                incarnation: u64::from_str_radix(inc, 16).map_err(|_| bad())?,
                dirty: flag(dirty)?,
                lost: flag(lost)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.len() != nodes {
        return Err(bad());
    }
    Ok(parsed)
}

impl DeviceRecord {
    fn to_text(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(ToString::to_string).collect();
        format!(
            "{MAGIC}\nid {}\nvolume {}\nsize {}\nstripe_unit {}\nnodes {}\nqueues {}\ndepth {}\nblock_size {}\ndata_path {}\npid {}\npid_start {}\nclient_id {}\ngeneration {}\nio_timeout {}\nnode_down_timeout {}\nsend {}\nvolume_ids {}\ndata_digest {}\ntls_ca {}\ntls_cert {}\ntls_key {}\ntls_danger_skip_server_name {}\ndurability {}\nreplicas {}\nreplica_timeout {}\nresync_rate {}\n",
            self.id,
            self.volume,
            self.size,
            self.stripe_unit,
            nodes.join(","),
            self.queues,
            self.depth,
            self.block_size,
            self.data_path,
            self.pid,
            self.pid_start,
            self.client_id,
            self.generation,
            self.io_timeout_secs,
            self.node_down_timeout_secs,
            self.send,
            // A replica out of sync may never have been reached: "-".
            self.volume_ids
                .iter()
                .map(|id| if id.is_empty() { "-" } else { id.as_str() })
                .collect::<Vec<_>>()
                .join(","),
            if self.data_digest { "crc32c" } else { "none" },
            self.tls
                .as_ref()
                .map_or(String::new(), |t| t.ca.display().to_string()),
            self.tls
                .as_ref()
                .map_or(String::new(), |t| t.cert.display().to_string()),
            self.tls
                .as_ref()
                .map_or(String::new(), |t| t.key.display().to_string()),
            u8::from(self.tls.as_ref().is_some_and(|t| t.danger_skip_server_name)),
            durability_text(&self.durability),
            self.replicas,
            self.replica_timeout_secs,
            self.resync_rate,
        )
    }

    fn parse(text: &str) -> Result<DeviceRecord, String> {
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default();
        let v2 = first == MAGIC_V2;
        let v3 = first == MAGIC_V3;
        let v4 = first == MAGIC_V4;
        let v5 = first == MAGIC_V5;
        if first != MAGIC && !v2 && !v3 && !v4 && !v5 {
            let shown: String = first.chars().take(40).collect();
            return Err(format!(
                "not a netblk device record: it starts with {shown:?}, not {MAGIC:?}"
            ));
        }
        // Every record we write ends with a newline: without one, it was
        // cut short.
        if !text.ends_with('\n') {
            return Err("cut short (no final newline): a torn write?".into());
        }
        let fields: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(' ')).collect();
        for (i, (key, _)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(k, _)| k == key) {
                return Err(format!("'{key}' appears twice"));
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .ok_or_else(|| format!("missing '{key}'"))
        };
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, String> {
            v.parse().map_err(|_| format!("bad '{key}' value '{v}'"))
        }
        let nodes = get("nodes")?
            .split(',')
            .map(|n| num::<SocketAddr>("nodes", n))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes_len = nodes.len();
        Ok(DeviceRecord {
            id: num("id", get("id")?)?,
            volume: get("volume")?.to_string(),
            size: num("size", get("size")?)?,
            stripe_unit: num("stripe_unit", get("stripe_unit")?)?,
            nodes,
            queues: num("queues", get("queues")?)?,
            depth: num("depth", get("depth")?)?,
            block_size: num("block_size", get("block_size")?)?,
            data_path: get("data_path")?.to_string(),
            pid: num("pid", get("pid")?)?,
            pid_start: num("pid_start", get("pid_start")?)?,
            client_id: get("client_id")?.to_string(),
            generation: num("generation", get("generation")?)?,
            io_timeout_secs: num("io_timeout", get("io_timeout")?)?,
            node_down_timeout_secs: num("node_down_timeout", get("node_down_timeout")?)?,
            // Required from version 5 on.
            replicas: if v2 || v3 || v4 {
                1
            } else {
                num("replicas", get("replicas")?)?
            },
            replica_timeout_secs: if v2 || v3 || v4 {
                5
            } else {
                num("replica_timeout", get("replica_timeout")?)?
            },
            // Required from version 6 on.
            resync_rate: if v2 || v3 || v4 || v5 {
                crate::resync::DEFAULT_RATE
            } else {
                num("resync_rate", get("resync_rate")?)?
            },
            send: match get("send")? {
                send @ ("zc" | "copy") => send.to_string(),
                other => return Err(format!("bad 'send' value '{other}'")),
            },
            // Required from version 3 on, so a record cut short before it
            // is an error, never a record without digests.
            data_digest: match if v2 { Ok("none") } else { get("data_digest") }? {
                "crc32c" => true,
                "none" => false,
                other => return Err(format!("bad 'data_digest' value '{other}'")),
            },
            tls: if v2 {
                None
            } else {
                let path = |key: &str| {
                    get(key).map(|v| (!v.is_empty()).then(|| std::path::PathBuf::from(v)))
                };
                match (path("tls_ca")?, path("tls_cert")?, path("tls_key")?) {
                    (Some(ca), Some(cert), Some(key)) => Some(netblk_tls::config::ClientFiles {
                        ca,
                        cert,
                        key,
                        danger_skip_server_name: match get("tls_danger_skip_server_name")? {
                            "0" => false,
                            "1" => true,
                            other => {
                                return Err(format!(
                                    "bad 'tls_danger_skip_server_name' value '{other}'"
                                ));
                            }
                        },
                    }),
                    (None, None, None) => None,
                    _ => {
                        return Err(
                            "'tls_ca', 'tls_cert' and 'tls_key' must be all set or all empty"
                                .into(),
                        );
                    }
                }
            },
            // Required from version 4 on, like `data_digest` from 3.
            durability: if v2 || v3 {
                Vec::new()
            } else {
                parse_durability(get("durability")?, nodes_len)?
            },
            volume_ids: match get("volume_ids")? {
                "" => Vec::new(),
                ids => {
                    let given: Vec<&str> = ids.split(',').collect();
                    let unknown = given.iter().filter(|id| **id == "-").count();
                    let ids: Vec<String> = given
                        .iter()
                        .map(|id| if *id == "-" { "" } else { id }.to_string())
                        .collect();
                    if ids.len() != nodes_len
                        || unknown == ids.len()
                        || given.iter().any(|id| {
                            id.is_empty()
                                || *id != "-" && !id.chars().all(|c| c.is_ascii_hexdigit())
                        })
                    {
                        return Err(format!("bad 'volume_ids' value '{}'", ids.join(",")));
                    }
                    ids
                }
            },
        })
    }
}

fn record_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("ublk{id}"))
}

fn not_ours(what: &Path, uid: u32) -> String {
    format!(
        "{} belongs to uid {uid}, not to this user (uid {})",
        what.display(),
        effective_uid()
    )
}

/// Checks the state directory before it is read: `Ok(false)` if there is
/// none; an error if it is a symbolic link, not a directory, or another
/// user's.
fn check_dir(dir: &Path) -> Result<bool, String> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(format!("state directory {}: {err}", dir.display())),
    };
    if meta.file_type().is_symlink() {
        return Err(format!(
            "state directory {} is a symbolic link: refusing to use it (point NETBLK_STATE_DIR at the real directory)",
            dir.display()
        ));
    }
    if !meta.is_dir() {
        return Err(format!(
            "state directory {} is not a directory",
            dir.display()
        ));
    }
    if meta.uid() != effective_uid() {
        return Err(format!("state directory {}", not_ours(dir, meta.uid())));
    }
    Ok(true)
}

/// Makes the state directory private before a record is written: creates
/// it with mode 0700 (and its parents as usual), or tightens an existing one
/// of ours to 0700; refuses one that [`check_dir`] refuses.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    let refuse = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
    if !check_dir(dir).map_err(refuse)? {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(err),
            _ => {}
        }
        // Made by us or, in a race, by someone else: look again.
        check_dir(dir).map_err(refuse)?;
    }
    let mode = fs::symlink_metadata(dir)?.permissions().mode();
    // Also undoes a umask that took bits from the mode asked for.
    if mode & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A new temporary file for record `id`, beside it: a name no one else
/// uses, created exclusively, without following links, mode 0600. Names
/// start with a dot, so [`list`] never takes one for a record.
fn create_temp(dir: &Path, id: u32) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".ublk{id}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => {
                // The umask may have taken bits from the mode asked for.
                file.set_permissions(fs::Permissions::from_mode(0o600))?;
                return Ok((tmp, file));
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => last = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?
        .sync_all()
}

/// Writes the record atomically and privately: a reader sees the old
/// record or the new one, never a part; see the module documentation.
pub fn save(dir: &Path, record: &DeviceRecord) -> io::Result<()> {
    prepare_dir(dir)?;
    let path = record_path(dir, record.id);
    let (tmp, mut file) = create_temp(dir, record.id)?;
    let written = file
        .write_all(record.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, &path));
    drop(file);
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err);
    }
    sync_dir(dir)
}

/// Reads and checks the record at `path`, which must be device `id`'s.
fn read_record(path: &Path, id: u32) -> Result<Option<DeviceRecord>, String> {
    let named = |why: String| format!("{}: {why}", path.display());
    // O_NONBLOCK: opening a FIFO planted here must not hang.
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(named(
                "is a symbolic link: refusing to follow it (remove it)".into(),
            ));
        }
        Err(err) => return Err(named(err.to_string())),
    };
    let meta = file.metadata().map_err(|e| named(e.to_string()))?;
    if !meta.is_file() {
        return Err(named("is not a regular file".into()));
    }
    if meta.uid() != effective_uid() {
        return Err(not_ours(path, meta.uid()));
    }
    let too_large = || named(format!("larger than any record ({MAX_RECORD_BYTES} bytes)"));
    if meta.len() > MAX_RECORD_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| named(e.to_string()))?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(too_large());
    }
    let text = String::from_utf8(bytes).map_err(|_| named("not a text file".into()))?;
    let record = DeviceRecord::parse(&text).map_err(named)?;
    if record.id != id {
        return Err(named(format!("records device {}, not {id}", record.id)));
    }
    Ok(Some(record))
}

/// The record of device `id`, if there is one.
pub fn load(dir: &Path, id: u32) -> Result<Option<DeviceRecord>, String> {
    if !check_dir(dir)? {
        return Ok(None);
    }
    read_record(&record_path(dir, id), id)
}

pub fn remove(dir: &Path, id: u32) -> io::Result<()> {
    match fs::remove_file(record_path(dir, id)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Every record, by device id; one that cannot be read is an error naming
/// its file, among the others (and so is a state directory that cannot be
/// read).
pub fn list(dir: &Path) -> Vec<Result<DeviceRecord, String>> {
    match check_dir(dir) {
        Ok(true) => {}
        Ok(false) => return Vec::new(),
        Err(why) => return vec![Err(why)],
    }
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => return vec![Err(format!("state directory {}: {err}", dir.display()))],
    };
    let mut ids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            let id: u32 = name.strip_prefix("ublk")?.parse().ok()?;
            // Only the name the record of `id` has (not `ublk007`).
            (name == format!("ublk{id}")).then_some(id)
        })
        .collect();
    ids.sort_unstable();
    ids.into_iter()
        .filter_map(|id| read_record(&record_path(dir, id), id).transpose())
        .collect()
}

/// Parses `/dev/ublkbN`, `ublkbN` or `N`.
pub fn parse_device(text: &str) -> Result<u32, String> {
    let id = text
        .trim()
        .trim_start_matches("/dev/")
        .trim_start_matches("ublkb")
        .trim_start_matches("ublkc");
    id.parse()
        .map_err(|_| format!("'{text}' is not a netblk device (expected /dev/ublkbN or N)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> DeviceRecord {
        DeviceRecord {
            id: 3,
            volume: "v".into(),
            size: 1 << 30,
            stripe_unit: 65536,
            nodes: vec![
                "127.0.0.1:7001".parse().expect("addr"),
                "127.0.0.1:7002".parse().expect("addr"),
            ],
            queues: 2,
            depth: 64,
            block_size: 512,
            data_path: "full zero copy".into(),
            pid: 42,
            pid_start: 1234,
            client_id: "netblk-42-00ff".into(),
            generation: 3,
            io_timeout_secs: 30,
            node_down_timeout_secs: 15,
            replicas: 1,
            replica_timeout_secs: 5,
            resync_rate: 16 << 20,
            send: "zc".into(),
            volume_ids: vec!["0a1b".into(), "2c3d".into()],
            durability: vec![
                NodeDurability {
                    incarnation: 0x7f00_0000_0000_0001,
                    dirty: true,
                    lost: false,
                },
                NodeDurability {
                    incarnation: 9,
                    dirty: false,
                    lost: true,
                },
            ],
            data_digest: true,
            tls: Some(netblk_tls::config::ClientFiles {
                ca: "/etc/netblk/tls/ca.pem".into(),
                cert: "/etc/netblk/tls/client.pem".into(),
                key: "/etc/netblk/tls/client.key".into(),
                danger_skip_server_name: false,
            }),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_device_whose_daemon_is_gone_needs_recovery() {
        use crate::ublk::sys::{
            UBLK_S_DEV_DEAD, UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED,
        };
        // A daemon that exited (a queue failed, or it was killed): the
        // kernel says LIVE until it lets go of it, then QUIESCED.
        for state in [UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED, UBLK_S_DEV_FAIL_IO, 9] {
            assert_eq!(device_state(Some(state), false), "needs-recovery");
        }
        assert_eq!(device_state(Some(UBLK_S_DEV_LIVE), true), "live");
        assert_eq!(device_state(Some(UBLK_S_DEV_QUIESCED), true), "quiesced");
        assert_eq!(device_state(Some(UBLK_S_DEV_FAIL_IO), true), "failing-io");
        assert_eq!(device_state(Some(9), true), "unknown");
        // Stopped: nothing to recover, with or without a daemon.
        assert_eq!(device_state(Some(UBLK_S_DEV_DEAD), false), "stopped");
        assert_eq!(device_state(Some(UBLK_S_DEV_DEAD), true), "stopped");
        assert_eq!(device_state(None, false), "gone");
        assert_eq!(device_state(None, true), "gone");
    }

    #[test]
    fn records_round_trip_and_list() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &record()).expect("save");
        assert_eq!(load(&dir, 3), Ok(Some(record())));
        assert_eq!(load(&dir, 4), Ok(None));
        assert_eq!(list(&dir), vec![Ok(record())]);
        remove(&dir, 3).expect("remove");
        remove(&dir, 3).expect("removing twice is fine");
        assert!(list(&dir).is_empty());
        assert!(
            list(&tmp.path().join("none")).is_empty(),
            "no directory: no records"
        );
    }

    #[test]
    fn records_are_written_atomically_and_privately() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &record()).expect("save");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ublk3")), 0o600);
        let newer = DeviceRecord {
            generation: 4,
            ..record()
        };
        save(&dir, &newer).expect("save over");
        assert_eq!(load(&dir, 3), Ok(Some(newer)));
        assert_eq!(mode(&dir.join("ublk3")), 0o600);
        assert_eq!(names(&dir), vec!["ublk3"], "no temporary file is left");
    }

    #[test]
    fn a_loose_state_directory_is_tightened() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        save(&dir, &record()).expect("save");
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn a_symlinked_state_directory_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("real");
        save(&real, &record()).expect("save");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = save(&link, &record()).expect_err("refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let err = load(&link, 3).expect_err("refused");
        assert!(err.contains("symbolic link"), "{err}");
        let listed = list(&link);
        assert_eq!(listed.len(), 1);
        assert!(
            listed[0]
                .as_ref()
                .is_err_and(|e| e.contains("symbolic link"))
        );
        assert_eq!(
            names(&real),
            vec!["ublk3"],
            "nothing written through the link"
        );
    }

    #[test]
    fn a_symlinked_record_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &record()).expect("save");
        let elsewhere = tmp.path().join("elsewhere");
        fs::rename(dir.join("ublk3"), &elsewhere).expect("move");
        std::os::unix::fs::symlink(&elsewhere, dir.join("ublk3")).expect("symlink");
        let err = load(&dir, 3).expect_err("refused");
        assert!(
            err.contains("ublk3") && err.contains("symbolic link"),
            "{err}"
        );
    }

    #[test]
    fn every_torn_record_is_an_error() {
        let text = record().to_text();
        assert!(DeviceRecord::parse(&text).is_ok());
        for len in 0..text.len() {
            assert!(
                DeviceRecord::parse(&text[..len]).is_err(),
                "cut at {len}: {:?}",
                &text[..len]
            );
        }
    }

    #[test]
    fn bad_records_name_their_file_and_the_others_still_list() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &DeviceRecord { id: 1, ..record() }).expect("save");
        save(&dir, &DeviceRecord { id: 9, ..record() }).expect("save");
        let text = record().to_text();
        let mut oversized = text.clone();
        oversized.push_str(&"# padding\n".repeat(8000));
        let bad: [(u32, Vec<u8>, &str); 6] = [
            (2, text.as_bytes()[..text.len() / 2].to_vec(), "cut short"),
            (3, vec![0xff, 0x00, 0x13, 0x37], "not a text file"),
            (4, oversized.into_bytes(), "larger than any record"),
            (
                5,
                text.replace(MAGIC, "netblk-device 1").into_bytes(),
                "not a netblk device record",
            ),
            (6, text.clone().into_bytes(), "records device 3, not 6"),
            (7, Vec::new(), "not a netblk device record"),
        ];
        for (id, bytes, _) in &bad {
            fs::write(dir.join(format!("ublk{id}")), bytes).expect("write");
        }
        let listed = list(&dir);
        assert_eq!(listed.len(), 8, "{listed:?}");
        assert_eq!(listed[0], Ok(DeviceRecord { id: 1, ..record() }));
        assert_eq!(listed[7], Ok(DeviceRecord { id: 9, ..record() }));
        for ((id, _, why), listed) in bad.iter().zip(&listed[1..7]) {
            let err = listed.as_ref().expect_err("a bad record");
            let file = dir.join(format!("ublk{id}"));
            assert!(
                err.starts_with(&format!("{}: ", file.display())) && err.contains(why),
                "ublk{id}: {err}"
            );
            assert_eq!(load(&dir, *id).as_ref(), Err(err));
        }
    }

    #[test]
    fn a_record_that_is_no_regular_file_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &record()).expect("save");
        fs::create_dir(dir.join("ublk4")).expect("mkdir");
        let err = load(&dir, 4).expect_err("a directory");
        assert!(
            err.contains("ublk4") && err.contains("not a regular file"),
            "{err}"
        );
        // A FIFO would block a plain open forever.
        let fifo = dir.join("ublk5");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = load(&dir, 5).expect_err("a FIFO");
            assert!(
                err.contains("ublk5") && err.contains("not a regular file"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_record_of_another_user_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        save(&dir, &record()).expect("save");
        let other = effective_uid().wrapping_add(4242);
        if std::os::unix::fs::chown(dir.join("ublk3"), Some(other), None).is_err() {
            eprintln!("skipped: cannot give a file to another user here");
            return;
        }
        let err = load(&dir, 3).expect_err("another user's");
        assert!(
            err.contains("ublk3") && err.contains(&format!("uid {other}")),
            "{err}"
        );
        std::os::unix::fs::chown(&dir, Some(other), None).expect("chown dir");
        let err = save(&dir, &record()).expect_err("another user's directory");
        assert!(err.to_string().contains(&format!("uid {other}")), "{err}");
    }

    #[test]
    fn junk_is_an_error_and_devices_parse() {
        assert!(DeviceRecord::parse("hello").is_err());
        assert!(DeviceRecord::parse("netblk-device 2\nid x\n").is_err());
        assert_eq!(parse_device("/dev/ublkb7"), Ok(7));
        assert_eq!(parse_device("ublkb12"), Ok(12));
        assert_eq!(parse_device("5"), Ok(5));
        assert!(parse_device("/dev/sda").is_err());
    }

    #[test]
    fn durability_is_kept_and_checked_and_an_older_record_knows_none() {
        let text = record().to_text();
        assert!(
            text.contains("\ndurability 7f00000000000001:1:0,9:0:1\n"),
            "{text}"
        );
        assert_eq!(DeviceRecord::parse(&text), Ok(record()));
        for bad in [
            "durability 7f00000000000001:1:0",
            "durability 7f00000000000001:1:0,9:0:2",
            "durability 7f00000000000001:1,9:0:1",
            "durability zz:1:0,9:0:1",
            "durability ",
        ] {
            let text = text.replace("durability 7f00000000000001:1:0,9:0:1", bad);
            let err = DeviceRecord::parse(&text).expect_err(bad);
            assert!(err.contains("durability"), "{err}");
        }
        let v3 = text
            .replace("durability 7f00000000000001:1:0,9:0:1\n", "")
            .replace(MAGIC, MAGIC_V3);
        assert_eq!(
            DeviceRecord::parse(&v3).map(|r| r.durability),
            Ok(Vec::new())
        );
        let missing = text.replace("durability 7f00000000000001:1:0,9:0:1\n", "");
        assert!(
            DeviceRecord::parse(&missing).is_err(),
            "required from version 4"
        );
    }

    #[test]
    fn volume_ids_are_kept_and_checked() {
        let text = record().to_text();
        assert_eq!(DeviceRecord::parse(&text), Ok(record()));
        // Nothing pinned yet (the next connect pins).
        let unpinned = text.replace("volume_ids 0a1b,2c3d", "volume_ids ");
        assert_eq!(
            DeviceRecord::parse(&unpinned).map(|r| r.volume_ids),
            Ok(Vec::new())
        );
        // A replica never reached (out of sync since before the map).
        let one_unknown = DeviceRecord {
            volume_ids: vec!["0a1b".into(), String::new()],
            ..record()
        };
        assert!(one_unknown.to_text().contains("volume_ids 0a1b,-\n"));
        assert_eq!(DeviceRecord::parse(&one_unknown.to_text()), Ok(one_unknown));
        for bad in [
            "volume_ids 0a1b",
            "volume_ids 0a1b,zz",
            "volume_ids 0a1b,",
            "volume_ids -,-",
        ] {
            let text = text.replace("volume_ids 0a1b,2c3d", bad);
            let err = DeviceRecord::parse(&text).expect_err(bad);
            assert!(err.contains("volume_ids"), "{err}");
        }
    }

    #[test]
    fn the_resync_rate_is_kept_and_a_record_without_it_has_the_default() {
        let text = record().to_text();
        assert!(text.contains("\nresync_rate 16777216\n"));
        assert_eq!(
            DeviceRecord::parse(&text).map(|r| r.resync_rate),
            Ok(16 << 20)
        );
        let older = text
            .replace("resync_rate 16777216\n", "")
            .replace("netblk-device 6", "netblk-device 5");
        assert_eq!(
            DeviceRecord::parse(&older).map(|r| r.resync_rate),
            Ok(crate::resync::DEFAULT_RATE)
        );
        let bad = text.replace("resync_rate 16777216", "resync_rate fast");
        let err = DeviceRecord::parse(&bad).expect_err("bad rate");
        assert!(err.contains("resync_rate"), "{err}");
    }

    #[test]
    fn the_data_digest_is_kept_and_an_older_record_has_none() {
        let text = record().to_text();
        assert!(text.contains("\ndata_digest crc32c\n"));
        let older = text
            .replace("data_digest crc32c\n", "")
            .replace(MAGIC, MAGIC_V2);
        assert_eq!(
            DeviceRecord::parse(&older).map(|r| r.data_digest),
            Ok(false)
        );
        let lost = text.replace("data_digest crc32c\n", "");
        let err = DeviceRecord::parse(&lost).expect_err("version 3 without data_digest");
        assert!(err.contains("data_digest"), "{err}");
        let bad = text.replace("data_digest crc32c", "data_digest md5");
        let err = DeviceRecord::parse(&bad).expect_err("md5");
        assert!(err.contains("data_digest"), "{err}");
    }
}

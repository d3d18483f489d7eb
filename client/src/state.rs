//! What netblk remembers about its devices, one small file per device under
//! the state directory (`$NETBLK_STATE_DIR`, default `/run/netblk`): enough
//! for `netblk list` and `netblk unmap` to work from another process.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// `zc` or `copy`.
    pub send: String,
}

impl DeviceRecord {
    fn to_text(&self) -> String {
        let nodes: Vec<String> = self.nodes.iter().map(ToString::to_string).collect();
        format!(
            "netblk-device 2\nid {}\nvolume {}\nsize {}\nstripe_unit {}\nnodes {}\nqueues {}\ndepth {}\nblock_size {}\ndata_path {}\npid {}\npid_start {}\nclient_id {}\ngeneration {}\nio_timeout {}\nnode_down_timeout {}\nsend {}\n",
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
            self.send
        )
    }

    fn parse(text: &str) -> Result<DeviceRecord, String> {
        let mut lines = text.lines();
        if lines.next() != Some("netblk-device 2") {
            return Err("not a netblk device record (version 2)".into());
        }
        let fields: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(' ')).collect();
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
            send: get("send")?.to_string(),
        })
    }
}

fn record_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("ublk{id}"))
}

/// Writes the record atomically (temporary file, then rename).
pub fn save(dir: &Path, record: &DeviceRecord) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let path = record_path(dir, record.id);
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, record.to_text())?;
    fs::rename(&tmp, &path)
}

/// The record of device `id`, if there is one.
pub fn load(dir: &Path, id: u32) -> Result<Option<DeviceRecord>, String> {
    let path = record_path(dir, id);
    match fs::read_to_string(&path) {
        Ok(text) => DeviceRecord::parse(&text)
            .map(Some)
            .map_err(|why| format!("{}: {why}", path.display())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

pub fn remove(dir: &Path, id: u32) -> io::Result<()> {
    match fs::remove_file(record_path(dir, id)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Every record, by device id; unreadable ones are reported, not skipped silently.
pub fn list(dir: &Path) -> Vec<Result<DeviceRecord, String>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublk")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids.into_iter()
        .filter_map(|id| load(dir, id).transpose())
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
            send: "zc".into(),
        }
    }

    #[test]
    fn records_round_trip_and_list() {
        let dir = std::env::temp_dir().join(format!("netblk-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        save(&dir, &record()).expect("save");
        assert_eq!(load(&dir, 3), Ok(Some(record())));
        assert_eq!(load(&dir, 4), Ok(None));
        assert_eq!(list(&dir), vec![Ok(record())]);
        remove(&dir, 3).expect("remove");
        remove(&dir, 3).expect("removing twice is fine");
        assert!(list(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
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
}

//! Volume files: `/etc/netblk/volumes/NAME.toml` describes a volume for
//! `netblk map --config`, so that a host (or its systemd unit) maps it by
//! name. Every key is optional here except `nodes` and `size` (or `pool`); flags given
//! on the command line override the file. Unknown keys and values of the
//! wrong kind are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use netblk_protocol::units::parse_size;

/// Where the systemd unit looks for volume files.
pub const VOLUMES_DIR: &str = "/etc/netblk/volumes";

/// What a volume file says. `None`: the key is absent (the flag or the
/// default applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeFile {
    /// The volume's name: the `volume` key, else the file's name without
    /// `.toml`.
    pub volume: String,
    pub nodes: Option<Vec<SocketAddr>>,
    pub size: Option<u64>,
    pub stripe_unit: Option<u32>,
    pub queues: Option<usize>,
    pub depth: Option<u16>,
    pub block_size: Option<u32>,
    pub send: Option<String>,
    pub zero_copy: Option<String>,
    pub io_timeout: Option<u64>,
    pub node_down_timeout: Option<u64>,
    pub replicas: Option<u32>,
    pub replica_timeout: Option<u64>,
    pub resync_rate: Option<u64>,
    pub metrics_addr: Option<SocketAddr>,
    /// `crc32c` or `none`.
    pub data_digest: Option<String>,
    /// Mutual TLS: the nodes' CA, this client's certificate and key.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_danger_skip_server_name: Option<bool>,
    /// The volume identity each node must hold, in node order (checked
    /// with the nodes by `netblk map`).
    pub volume_ids: Option<Vec<String>>,
    /// A pool file: the volume's nodes, layout and size come from its
    /// placement record on the pool's nodes (instead of `nodes`).
    pub pool: Option<PathBuf>,
}

/// The keys a volume file may have, as the error for an unknown one lists
/// them.
pub const KEYS: &[&str] = &[
    "volume",
    "nodes",
    "size",
    "stripe_unit",
    "queues",
    "depth",
    "block_size",
    "send",
    "zero_copy",
    "io_timeout",
    "node_down_timeout",
    "replicas",
    "replica_timeout",
    "resync_rate",
    "metrics_addr",
    "data_digest",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_danger_skip_server_name",
    "volume_ids",
    "pool",
];

/// Reads and checks the volume file at `path`; errors start with the path.
pub fn load(path: &Path) -> Result<VolumeFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read volume file {}: {e}", path.display()))?;
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".toml").unwrap_or(n))
        .unwrap_or_default();
    parse(&text, stem).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a volume file's text; `stem` names the volume when the file does
/// not.
pub fn parse(text: &str, stem: &str) -> Result<VolumeFile, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
    if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key `{key}` (a volume file may have: {})",
            KEYS.join(", ")
        ));
    }
    let get = |key: &'static str| table.get(key).map(|v| Value { key, v });
    Ok(VolumeFile {
        volume: get("volume")
            .map(|v| v.string())
            .transpose()?
            .unwrap_or_else(|| stem.to_string()),
        nodes: get("nodes").map(|v| v.nodes()).transpose()?,
        size: get("size").map(|v| v.size()).transpose()?,
        stripe_unit: get("stripe_unit")
            .map(|v| v.size().and_then(|s| v.fit(s)))
            .transpose()?,
        queues: get("queues").map(|v| v.number()).transpose()?,
        depth: get("depth").map(|v| v.number()).transpose()?,
        block_size: get("block_size").map(|v| v.number()).transpose()?,
        send: get("send").map(|v| v.choice(&["zc", "copy"])).transpose()?,
        zero_copy: get("zero_copy")
            .map(|v| v.choice(&["auto", "on", "off"]))
            .transpose()?,
        io_timeout: get("io_timeout").map(|v| v.integer()).transpose()?,
        node_down_timeout: get("node_down_timeout").map(|v| v.integer()).transpose()?,
        replicas: get("replicas").map(|v| v.number()).transpose()?,
        replica_timeout: get("replica_timeout").map(|v| v.integer()).transpose()?,
        resync_rate: get("resync_rate").map(|v| v.size()).transpose()?,
        metrics_addr: get("metrics_addr").map(|v| v.addr()).transpose()?,
        data_digest: get("data_digest")
            .map(|v| v.choice(&["crc32c", "none"]))
            .transpose()?,
        tls_ca: get("tls_ca")
            .map(|v| v.string().map(PathBuf::from))
            .transpose()?,
        tls_cert: get("tls_cert")
            .map(|v| v.string().map(PathBuf::from))
            .transpose()?,
        tls_key: get("tls_key")
            .map(|v| v.string().map(PathBuf::from))
            .transpose()?,
        tls_danger_skip_server_name: get("tls_danger_skip_server_name")
            .map(|v| v.boolean())
            .transpose()?,
        volume_ids: get("volume_ids").map(|v| v.strings()).transpose()?,
        pool: get("pool")
            .map(|v| v.string().map(PathBuf::from))
            .transpose()?,
    })
}

/// One key's value, for errors that name the key.
struct Value<'a> {
    key: &'static str,
    v: &'a toml::Value,
}

impl Value<'_> {
    fn wrong(&self, expected: &str) -> String {
        format!(
            "key `{}`: expected {expected}, found {} {}",
            self.key,
            self.v.type_str(),
            show(self.v)
        )
    }

    fn string(&self) -> Result<String, String> {
        self.v
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.wrong("a string"))
    }

    fn integer(&self) -> Result<u64, String> {
        self.v
            .as_integer()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| self.wrong("a whole number, 0 or more"))
    }

    /// A number that must fit a narrower type.
    fn fit<T: TryFrom<u64>>(&self, n: u64) -> Result<T, String> {
        T::try_from(n).map_err(|_| format!("key `{}`: {n} is too large", self.key))
    }

    /// A whole number that fits `T`.
    fn number<T: TryFrom<u64>>(&self) -> Result<T, String> {
        self.integer().and_then(|n| self.fit(n))
    }

    /// Bytes: a whole number, or a string with a K, M, G or T suffix.
    fn size(&self) -> Result<u64, String> {
        match self.v {
            toml::Value::String(s) => parse_size(s).map_err(|e| format!("key `{}`: {e}", self.key)),
            _ => self
                .integer()
                .map_err(|_| self.wrong("bytes (a whole number, or a string such as \"10G\")")),
        }
    }

    fn choice(&self, allowed: &[&str]) -> Result<String, String> {
        let s = self.string()?;
        if allowed.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(format!(
                "key `{}`: '{s}' is not one of {}",
                self.key,
                allowed.join(", ")
            ))
        }
    }

    fn boolean(&self) -> Result<bool, String> {
        self.v.as_bool().ok_or_else(|| self.wrong("true or false"))
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        let s = self.string()?;
        s.parse()
            .map_err(|_| format!("key `{}`: '{s}' is not an address IP:PORT", self.key))
    }

    fn strings(&self) -> Result<Vec<String>, String> {
        let list = self
            .v
            .as_array()
            .ok_or_else(|| self.wrong("an array of strings"))?;
        list.iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    format!(
                        "key `{}`: entry {} ({}) is not a string",
                        self.key,
                        i + 1,
                        show(s)
                    )
                })
            })
            .collect()
    }

    fn nodes(&self) -> Result<Vec<SocketAddr>, String> {
        let list = self
            .v
            .as_array()
            .ok_or_else(|| self.wrong("an array of \"IP:PORT\" strings"))?;
        list.iter()
            .enumerate()
            .map(|(i, n)| {
                n.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    format!(
                        "key `{}`: entry {} ({}) is not \"IP:PORT\"",
                        self.key,
                        i + 1,
                        show(n)
                    )
                })
            })
            .collect()
    }
}

/// A value as the file wrote it, near enough for an error message.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(a) => format!("[{} entries]", a.len()),
        toml::Value::Table(_) => "{...}".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
# The volume "db" over three nodes.
nodes = ["10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"]
size = "100G"
stripe_unit = "256K"
queues = 2
depth = 128
block_size = 4096
send = "copy"
zero_copy = "off"
io_timeout = 20
node_down_timeout = 10
replicas = 2
replica_timeout = 3
resync_rate = "16M"
metrics_addr = "127.0.0.1:9400"
data_digest = "crc32c"
tls_ca = "/etc/netblk/tls/ca.pem"
tls_cert = "/etc/netblk/tls/client.pem"
tls_key = "/etc/netblk/tls/client.key"
tls_danger_skip_server_name = false
volume_ids = ["0a", "0b", "0c"]
"#;

    #[test]
    fn a_full_file_gives_every_key() {
        let f = parse(FULL, "db").expect("parses");
        assert_eq!(f.volume, "db", "named after the file");
        assert_eq!(f.nodes.as_ref().map(Vec::len), Some(3));
        assert_eq!(f.size, Some(100 << 30));
        assert_eq!(f.stripe_unit, Some(256 << 10));
        assert_eq!(f.queues, Some(2));
        assert_eq!(f.depth, Some(128));
        assert_eq!(f.block_size, Some(4096));
        assert_eq!(f.send.as_deref(), Some("copy"));
        assert_eq!(f.zero_copy.as_deref(), Some("off"));
        assert_eq!(f.io_timeout, Some(20));
        assert_eq!(f.node_down_timeout, Some(10));
        assert_eq!((f.replicas, f.replica_timeout), (Some(2), Some(3)));
        assert_eq!(f.resync_rate, Some(16 << 20));
        assert_eq!(f.data_digest.as_deref(), Some("crc32c"));
        assert_eq!(
            f.tls_cert.as_deref(),
            Some(Path::new("/etc/netblk/tls/client.pem"))
        );
        assert_eq!(f.tls_danger_skip_server_name, Some(false));
        assert_eq!(
            f.volume_ids,
            Some(vec!["0a".to_string(), "0b".into(), "0c".into()])
        );
        assert_eq!(
            f.metrics_addr,
            Some("127.0.0.1:9400".parse().expect("addr"))
        );
    }

    #[test]
    fn absent_keys_are_none_and_the_volume_key_wins_over_the_file_name() {
        let f = parse("volume = \"other\"\nsize = 1048576\n", "db").expect("parses");
        assert_eq!(f.volume, "other");
        assert_eq!(f.size, Some(1 << 20));
        assert_eq!(f.nodes, None);
        assert_eq!(f.depth, None);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| parse(text, "v").expect_err(text);
        assert!(err("dpeth = 4").contains("unknown key `dpeth`"));
        assert!(err("depth = \"deep\"").contains("key `depth`: expected a whole number"));
        assert!(err("depth = -1").contains("key `depth`"));
        assert!(err("depth = 70000").contains("key `depth`: 70000 is too large"));
        assert!(err("size = \"10X\"").starts_with("key `size`:"));
        assert!(err("size = true").contains("key `size`: expected bytes"));
        assert!(err("nodes = \"10.0.0.1:7001\"").contains("key `nodes`: expected an array"));
        assert!(err("nodes = [\"10.0.0.1\"]").contains("key `nodes`: entry 1"));
        assert!(err("send = \"fast\"").contains("key `send`: 'fast' is not one of zc, copy"));
        assert!(err("zero_copy = 1").contains("key `zero_copy`: expected a string"));
        assert!(err("metrics_addr = \"here\"").contains("key `metrics_addr`"));
        assert!(err("size = ").starts_with("not valid TOML"));
        assert!(err("volume_ids = \"0a\"").contains("key `volume_ids`: expected an array"));
        assert!(err("volume_ids = [1]").contains("key `volume_ids`: entry 1"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("vol1.toml");
        std::fs::write(&path, "size = \"1G\"\n").expect("write");
        assert_eq!(load(&path).expect("loads").volume, "vol1");
        std::fs::write(&path, "sise = 1\n").expect("write");
        let err = load(&path).expect_err("unknown key");
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        let missing = dir.path().join("nope.toml");
        assert!(
            load(&missing)
                .expect_err("missing")
                .contains("cannot read volume file")
        );
    }
}

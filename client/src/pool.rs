//! Pool files: the storage nodes an operator offers to netblk, each with an
//! address, a weight (its capacity, in any unit as long as the file uses
//! one) and failure-domain labels. `netblk pool check FILE` validates one;
//! [`crate::placement`] chooses a volume's nodes from it.
//!
//! ```toml
//! [[node]]
//! address = "10.0.1.1:7000"
//! weight = 4          # optional, default 1
//! zone = "a"          # optional labels
//! rack = "a1"
//! host = "s1"         # default: the address's IP
//! name = "s1-disk0"   # optional, default: the address; what the hash sees
//! ```
//!
//! Unknown keys, duplicate addresses or names, and weights that are not
//! positive finite numbers are errors that name the node and the key.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

/// A failure-domain level, from the widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Zone,
    Rack,
    Host,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Zone, Level::Rack, Level::Host];

    pub fn name(self) -> &'static str {
        match self {
            Level::Zone => "zone",
            Level::Rack => "rack",
            Level::Host => "host",
        }
    }

    pub fn parse(text: &str) -> Result<Level, String> {
        Level::ALL
            .into_iter()
            .find(|l| l.name() == text)
            .ok_or_else(|| format!("'{text}' is not a failure-domain level (zone, rack or host)"))
    }
}

/// One node of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolNode {
    /// What placement hashes: stays the same when the node's address
    /// changes, if the file gives it.
    pub name: String,
    pub address: SocketAddr,
    pub weight: f64,
    pub zone: Option<String>,
    pub rack: Option<String>,
    /// The `host` label, else the address's IP.
    pub host: String,
}

impl PoolNode {
    /// The node's domain at `level`, if it has a label there.
    pub fn domain(&self, level: Level) -> Option<&str> {
        match level {
            Level::Zone => self.zone.as_deref(),
            Level::Rack => self.rack.as_deref(),
            Level::Host => Some(&self.host),
        }
    }
}

/// A validated pool: at least one node, addresses and names unique.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub nodes: Vec<PoolNode>,
}

const KEYS: [&str; 6] = ["address", "weight", "zone", "rack", "host", "name"];

impl Pool {
    /// Parses and validates a pool file's text.
    pub fn parse(text: &str) -> Result<Pool, String> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
        if let Some(key) = table.keys().find(|k| k.as_str() != "node") {
            return Err(format!(
                "unknown key `{key}` (a pool file holds [[node]] entries only)"
            ));
        }
        let entries = match table.get("node") {
            None => return Err("no [[node]] entries: a pool needs at least one node".into()),
            Some(toml::Value::Array(entries)) => entries,
            Some(_) => return Err("`node` must be a list of [[node]] tables".into()),
        };
        let mut nodes = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = i + 1;
            let table = entry
                .as_table()
                .ok_or_else(|| format!("node {at}: not a table"))?;
            nodes.push(node(table).map_err(|e| format!("node {at}: {e}"))?);
        }
        Pool::new(nodes)
    }

    /// A pool of `nodes`, checked: at least one, addresses and names unique.
    pub fn new(nodes: Vec<PoolNode>) -> Result<Pool, String> {
        if nodes.is_empty() {
            return Err("no [[node]] entries: a pool needs at least one node".into());
        }
        let (mut addresses, mut names) = (HashSet::new(), HashSet::new());
        for (i, n) in nodes.iter().enumerate() {
            if !addresses.insert(n.address) {
                return Err(format!(
                    "node {}: address {} is listed twice",
                    i + 1,
                    n.address
                ));
            }
            if !names.insert(n.name.as_str()) {
                return Err(format!("node {}: name '{}' is listed twice", i + 1, n.name));
            }
        }
        Ok(Pool { nodes })
    }

    /// Reads and validates a pool file.
    pub fn load(path: &std::path::Path) -> Result<Pool, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read pool file {}: {e}", path.display()))?;
        Pool::parse(&text).map_err(|e| format!("pool file {}: {e}", path.display()))
    }

    pub fn total_weight(&self) -> f64 {
        self.nodes.iter().map(|n| n.weight).sum()
    }

    /// The domains at `level` with their nodes' indices (nodes without a
    /// label there are left out).
    pub fn domains(&self, level: Level) -> BTreeMap<&str, Vec<usize>> {
        let mut domains: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(d) = n.domain(level) {
                domains.entry(d).or_default().push(i);
            }
        }
        domains
    }

    /// What `netblk pool check` prints: the nodes, their weight, and the
    /// domains at each level.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} node(s), total weight {}\n",
            self.nodes.len(),
            self.total_weight()
        );
        for level in Level::ALL {
            let domains = self.domains(level);
            let unlabelled = self
                .nodes
                .iter()
                .filter(|n| n.domain(level).is_none())
                .count();
            out.push_str(&format!("{:<5} {} domain(s)", level.name(), domains.len()));
            if unlabelled > 0 {
                out.push_str(&format!(
                    ", {unlabelled} node(s) without a {} label",
                    level.name()
                ));
            }
            out.push('\n');
        }
        for n in &self.nodes {
            out.push_str(&format!(
                "  {:<22} weight {:<8} zone {:<8} rack {:<8} host {:<10} name {}\n",
                n.address,
                n.weight,
                n.zone.as_deref().unwrap_or("-"),
                n.rack.as_deref().unwrap_or("-"),
                n.host,
                n.name
            ));
        }
        out
    }
}

/// A pool file's `text` without the `[[node]]` table of `pool.nodes[index]`
/// (everything else, comments included, as it was). Refused, asking for an
/// edit by hand, where the file does not write its nodes as `[[node]]`
/// tables one after another, so that the result would not be the pool
/// without that node.
pub fn without_node(text: &str, pool: &Pool, index: usize) -> Result<String, String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[node]]")
        .map(|(i, _)| i)
        .collect();
    let manual = || {
        "its nodes are not written as plain [[node]] tables: remove the node by hand".to_string()
    };
    let (Some(&start), true) = (headers.get(index), headers.len() == pool.nodes.len()) else {
        return Err(manual());
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |p| start + 1 + p);
    let rest: String = lines[..start].concat() + &lines[end..].concat();
    let mut expected = pool.nodes.clone();
    expected.remove(index);
    match Pool::parse(&rest) {
        Ok(left) if left.nodes == expected => Ok(rest),
        Err(_) if expected.is_empty() => {
            Err("it is the pool's only node: a pool needs at least one".into())
        }
        _ => Err(manual()),
    }
}

fn node(table: &toml::Table) -> Result<PoolNode, String> {
    if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key `{key}` (a node may have: {})",
            KEYS.join(", ")
        ));
    }
    let text = |key: &str| -> Result<Option<String>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(toml::Value::String(_)) => Err(format!("key `{key}`: empty")),
            Some(v) => Err(format!(
                "key `{key}`: expected a string, found {}",
                v.type_str()
            )),
        }
    };
    let address_text = text("address")?.ok_or("key `address` is missing")?;
    let address: SocketAddr = address_text
        .parse()
        .map_err(|_| format!("key `address`: '{address_text}' is not IP:PORT"))?;
    let weight = match table.get("weight") {
        None => 1.0,
        Some(toml::Value::Integer(n)) => *n as f64,
        Some(toml::Value::Float(f)) => *f,
        Some(v) => {
            return Err(format!(
                "key `weight`: expected a number, found {}",
                v.type_str()
            ));
        }
    };
    if !(weight.is_finite() && weight > 0.0) {
        return Err(format!("key `weight`: {weight} is not a positive number"));
    }
    Ok(PoolNode {
        name: text("name")?.unwrap_or_else(|| address.to_string()),
        address,
        weight,
        zone: text("zone")?,
        rack: text("rack")?,
        host: text("host")?.unwrap_or_else(|| address.ip().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
[[node]]
address = "10.0.0.1:7000"
weight = 2
zone = "a"
rack = "a1"

[[node]]
address = "10.0.0.2:7000"
zone = "b"
host = "s2"
name = "disk-2"
"#;

    #[test]
    fn a_pool_file_parses_with_defaults() {
        let pool = Pool::parse(TWO).expect("parse");
        assert_eq!(pool.nodes.len(), 2);
        let a = &pool.nodes[0];
        assert_eq!(a.weight, 2.0);
        assert_eq!(a.host, "10.0.0.1");
        assert_eq!(a.name, "10.0.0.1:7000");
        assert_eq!(a.domain(Level::Rack), Some("a1"));
        let b = &pool.nodes[1];
        assert_eq!(
            (b.weight, b.host.as_str(), b.name.as_str()),
            (1.0, "s2", "disk-2")
        );
        assert_eq!(b.domain(Level::Rack), None);
        assert_eq!(pool.total_weight(), 3.0);
        assert_eq!(pool.domains(Level::Zone).len(), 2);
        let summary = pool.summary();
        assert!(summary.contains("2 node(s), total weight 3"), "{summary}");
        assert!(
            summary.contains("1 node(s) without a rack label"),
            "{summary}"
        );
    }

    #[test]
    fn bad_pool_files_are_refused_naming_the_node_and_key() {
        let cases = [
            ("", "no [[node]] entries"),
            ("nodes = 1", "unknown key `nodes`"),
            ("node = 3", "list of [[node]] tables"),
            ("[[node]]\nweight = 1", "node 1: key `address` is missing"),
            (
                "[[node]]\naddress = \"x\"",
                "node 1: key `address`: 'x' is not IP:PORT",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nweight = 0",
                "node 1: key `weight`: 0 is not a positive",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nweight = -2.5",
                "not a positive",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nweight = \"big\"",
                "expected a number",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nzone = \"\"",
                "key `zone`: empty",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nzone = 3",
                "key `zone`: expected a string",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nrow = \"r\"",
                "node 1: unknown key `row`",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\n[[node]]\naddress = \"10.0.0.1:1\"",
                "node 2: address 10.0.0.1:1 is listed twice",
            ),
            (
                "[[node]]\naddress = \"10.0.0.1:1\"\nname = \"n\"\n[[node]]\naddress = \"10.0.0.2:1\"\nname = \"n\"",
                "node 2: name 'n' is listed twice",
            ),
            ("[[node]\n", "not valid TOML"),
        ];
        for (text, want) in cases {
            let err = Pool::parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn levels_parse_by_name() {
        assert_eq!(Level::parse("zone"), Ok(Level::Zone));
        assert_eq!(Level::parse("host"), Ok(Level::Host));
        assert!(Level::parse("row").is_err());
    }
}

//! A mock cluster: several `netblk-mock-node` processes on 127.0.0.1, each
//! with its own directory store in one temporary directory.

use std::net::SocketAddr;

use netblk::layout::VolumeSpec;

use crate::MockNode;

pub struct Cluster {
    pub nodes: Vec<MockNode>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` nodes, each with its own directory store.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// `n` nodes with extra arguments, each with its own directory store.
    pub fn start_with(n: usize, args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let nodes = (0..n)
            .map(|i| {
                let args = Cluster::node_args(&dir, i, args);
                MockNode::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .collect();
        Cluster { nodes, dir }
    }

    pub fn node_args(dir: &tempfile::TempDir, i: usize, extra: &[&str]) -> Vec<String> {
        let store = format!("dir:{}", dir.path().join(format!("node{i}")).display());
        let mut args = vec!["--store".to_string(), store];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Starts node `i` again at its address, on its store.
    pub fn restart(&mut self, i: usize, extra: &[&str]) {
        let addr = self.nodes[i].addr.to_string();
        let args = Cluster::node_args(&self.dir, i, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nodes[i] = MockNode::start_at(&addr, &args);
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    /// A volume over every node, with a 64 KiB stripe unit.
    pub fn spec(&self, name: &str, size: u64) -> VolumeSpec {
        VolumeSpec {
            replicas: 1,
            name: name.into(),
            size,
            stripe_unit: 64 << 10,
            nodes: self.addrs(),
        }
    }

    /// The bytes node `i` holds for `volume` (its sparse file).
    pub fn node_file(&self, i: usize, volume: &str) -> Vec<u8> {
        std::fs::read(
            self.dir
                .path()
                .join(format!("node{i}"))
                .join(format!("{volume}.vol")),
        )
        .expect("node's volume file")
    }
}

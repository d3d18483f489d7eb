//! A test host of our own: a network namespace joined to this one by a veth
//! pair, so a node can sit behind a link that the test sets down (packets
//! then vanish: no RST, no error, a silent peer). Made and removed by the
//! test itself; traffic never leaves the pair.

use std::net::Ipv4Addr;
use std::process::Command;

/// A namespace and the veth pair to it; removed on drop.
pub struct TestHost {
    pub netns: String,
    /// This side's and the namespace side's interface names.
    pub near: String,
    pub far: String,
    /// The namespace side's address.
    pub addr: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestHost {
    /// Makes the namespace and the link, numbered `n` (0..=255) so parallel
    /// tests do not collide. Err says why it could not (no root, no netns).
    pub fn new(n: u8) -> Result<TestHost, String> {
        let id = std::process::id() % 10_000;
        let host = TestHost {
            netns: format!("netblk-t{id}-{n}"),
            near: format!("nbk{id}h{n}"),
            far: format!("nbk{id}n{n}"),
            addr: Ipv4Addr::new(10, 213, n, 2),
        };
        ip(&["netns", "add", &host.netns])?;
        let near_addr = format!("10.213.{n}.1/30");
        let far_addr = format!("10.213.{n}.2/30");
        let setup = [
            vec![
                "link", "add", &host.near, "type", "veth", "peer", "name", &host.far,
            ],
            vec!["link", "set", &host.far, "netns", &host.netns],
            vec!["addr", "add", &near_addr, "dev", &host.near],
            vec!["link", "set", &host.near, "up"],
            vec![
                "-n",
                &host.netns,
                "addr",
                "add",
                &far_addr,
                "dev",
                &host.far,
            ],
            vec!["-n", &host.netns, "link", "set", &host.far, "up"],
            vec!["-n", &host.netns, "link", "set", "lo", "up"],
        ];
        for args in setup {
            ip(&args)?;
        }
        // The far side's hardware address, fixed in this side's neighbour
        // table as a switch's would be for a host that just vanished:
        // packets to it are sent and lost, not held waiting for ARP (which a
        // link without carrier would do, for seconds).
        let mac = Command::new("ip")
            .args(["netns", "exec", &host.netns, "cat"])
            .arg(format!("/sys/class/net/{}/address", host.far))
            .output()
            .map_err(|e| format!("read the far side's address: {e}"))?;
        let mac = String::from_utf8_lossy(&mac.stdout).trim().to_string();
        let far_ip = host.addr.to_string();
        ip(&[
            "neigh",
            "replace",
            &far_ip,
            "lladdr",
            &mac,
            "dev",
            &host.near,
            "nud",
            "permanent",
        ])?;
        Ok(host)
    }

    /// Sets the namespace's loopback down or up (down: nothing in it
    /// reaches even its own addresses).
    pub fn set_loopback(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.netns, "link", "set", "lo", state]).expect("set lo");
    }

    /// Sets the namespace side of the link down or up.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.netns, "link", "set", &self.far, state]).expect("set link");
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.near]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

//! The serving daemon's private control socket: a unix socket beside the
//! device's record (`ublkN.sock`, mode 0600 in the 0700 state directory).
//! A client writes one command line, the daemon answers one JSON line and
//! closes. Commands: `status` (the device, its data path and state, and
//! each node's connection, session, in-flight pieces, last error,
//! reconnects and p50/p99 latency over the last minute), and `resize BYTES
//! [force]` (online resize, see `resize`; answers `from` and `to`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::telemetry::{LatencyWindow, Source};

/// Every read and write on the socket is bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest command line and answer accepted.
const MAX_LINE: u64 = 1 << 20;
/// How often node latencies are sampled for the last-minute quantiles.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The socket of device `id` in the state directory `dir`.
pub fn socket_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("ublk{id}.sock"))
}

/// What the daemon does for a `resize` command: resizes to the bytes given
/// (shrinking only when forced) and returns the size before.
pub type ResizeFn = Box<dyn Fn(u64, bool) -> Result<u64, String> + Send>;

/// How long `netblk resize` waits for the daemon's answer: every node is
/// connected and told, each within its connect timeout.
pub const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the daemon does for a `scrub` command (`repair`: rewrite what
/// differs): the report, as JSON.
pub type ScrubFn = Arc<dyn Fn(bool) -> Result<serde_json::Value, String> + Send + Sync>;

/// How long `netblk scrub` waits for the daemon's answer: a scrub reads
/// every byte of every member (on the nodes) once.
pub const SCRUB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What the daemon does for a `replace OLD NEW` command: the member's
/// index once OLD is out and NEW is being rebuilt.
pub type ReplaceFn =
    Box<dyn Fn(std::net::SocketAddr, std::net::SocketAddr) -> Result<usize, String> + Send>;

/// What a daemon can do besides answering `status`.
#[derive(Default)]
pub struct Commands {
    pub resize: Option<ResizeFn>,
    pub scrub: Option<ScrubFn>,
    pub replace: Option<ReplaceFn>,
}

/// Serves the control socket of `source` at `path` from two threads (one
/// answers, one samples latencies) for as long as the process lives.
pub fn serve(path: &Path, source: Source, commands: Commands) -> io::Result<()> {
    // A socket left by a daemon that died is ours to replace.
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let source = Arc::new(source);
    let window = Arc::new(Mutex::new(LatencyWindow::starting(
        source.nodes.len(),
        Instant::now(),
    )));
    {
        let (source, window) = (Arc::clone(&source), Arc::clone(&window));
        std::thread::Builder::new()
            .name("status-sampler".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(SAMPLE_EVERY);
                    window
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .sample(&source, Instant::now());
                }
            })?;
    }
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Err(err) = answer(stream, &source, &window, &commands) {
                    tracing::debug!(error = %err, "control request failed");
                }
            }
        })?;
    Ok(())
}

fn answer(
    stream: UnixStream,
    source: &Source,
    window: &Mutex<LatencyWindow>,
    commands: &Commands,
) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    let words: Vec<&str> = line.split_whitespace().collect();
    if let ["scrub", args @ ..] = words.as_slice() {
        let asked = match (args, &commands.scrub) {
            (_, None) => Err("this device has one replica: nothing to compare"),
            ([], Some(scrub)) => Ok((Arc::clone(scrub), false)),
            (["repair"], Some(scrub)) => Ok((Arc::clone(scrub), true)),
            _ => Err("usage: scrub [repair]"),
        };
        let (scrub, repair) = match asked {
            Ok(asked) => asked,
            Err(why) => {
                let mut out = &stream;
                writeln!(out, "{}", serde_json::json!({ "error": why }))?;
                return out.flush();
            }
        };
        // Long: answered on a thread of its own, status goes on meanwhile.
        std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                let reply = match scrub(repair) {
                    Ok(report) => report,
                    Err(why) => serde_json::json!({ "error": why }),
                };
                let mut out = &stream;
                let _ = writeln!(out, "{reply}").and_then(|()| out.flush());
            })?;
        return Ok(());
    }
    let stream = &stream;
    if let ["replace", args @ ..] = words.as_slice() {
        let parsed = match args {
            [old, new] => old.parse().ok().zip(new.parse().ok()),
            _ => None,
        };
        let reply = match (parsed, &commands.replace) {
            (_, None) => {
                serde_json::json!({ "error": "this device has one replica: nothing to replace" })
            }
            (None, _) => serde_json::json!({ "error": "usage: replace OLD_ADDR NEW_ADDR" }),
            (Some((old, new)), Some(replace)) => match replace(old, new) {
                Ok(node) => serde_json::json!({ "node": node }),
                Err(why) => serde_json::json!({ "error": why }),
            },
        };
        let mut out = stream;
        writeln!(out, "{reply}")?;
        return out.flush();
    }
    let resize = commands.resize.as_ref();
    if let ["resize", args @ ..] = words.as_slice() {
        let (size, rest) = args.split_first().map_or(("", &[][..]), |(s, r)| (*s, r));
        let reply = match (size.parse::<u64>(), rest, resize) {
            (_, _, None) => serde_json::json!({ "error": "this daemon cannot resize its device" }),
            (Ok(to), [] | ["force"], Some(resize)) => match resize(to, rest == ["force"]) {
                Ok(from) => serde_json::json!({ "from": from, "to": to }),
                Err(why) => serde_json::json!({ "error": why }),
            },
            _ => serde_json::json!({ "error": "usage: resize BYTES [force]" }),
        };
        let mut out = stream;
        writeln!(out, "{reply}")?;
        return out.flush();
    }
    let reply = match line.trim() {
        "status" => {
            let earlier = window
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oldest()
                .to_vec();
            source.status("live", &earlier, Instant::now())
        }
        other => serde_json::json!({ "error": format!("unknown command '{other}'") }),
    };
    let mut out = stream;
    writeln!(out, "{reply}")?;
    out.flush()
}

/// Asks the daemon behind `path` for `command`; its JSON answer.
pub fn ask(path: &Path, command: &str) -> io::Result<serde_json::Value> {
    ask_within(path, command, IO_TIMEOUT)
}

/// As [`ask`], waiting at most `timeout` for the answer.
pub fn ask_within(path: &Path, command: &str, timeout: Duration) -> io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    writeln!(stream, "{command}")?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `netblk status`: every recorded device (or only `only`), as its daemon
/// tells it over the control socket, or from its record where no daemon
/// answers (`state` then says why). Unreadable records come back as errors.
pub fn status_all(
    dir: &Path,
    only: Option<u32>,
    mut device_state: impl FnMut(&crate::state::DeviceRecord) -> String,
) -> (Vec<serde_json::Value>, Vec<String>) {
    let mut devices = Vec::new();
    let mut errors = Vec::new();
    for record in crate::state::list(dir) {
        let record = match record {
            Ok(r) => r,
            Err(why) => {
                errors.push(why);
                continue;
            }
        };
        if only.is_some_and(|id| id != record.id) {
            continue;
        }
        let state = device_state(&record);
        let answer = if state == "live" {
            ask(&socket_path(dir, record.id), "status").map_err(|e| e.to_string())
        } else {
            Err(String::new())
        };
        devices.push(match answer {
            Ok(status) => status,
            Err(why) => serde_json::json!({
                "device": format!("/dev/ublkb{}", record.id),
                "volume": record.volume,
                "data_path": record.data_path,
                "state": state,
                "queues": record.queues,
                "error": if why.is_empty() { serde_json::Value::Null } else {
                    serde_json::Value::String(format!("its daemon did not answer: {why}"))
                },
                "nodes": record.nodes.iter().enumerate().map(|(i, a)| serde_json::json!({
                    "node": i, "address": a.to_string(),
                })).collect::<Vec<_>>(),
            }),
        });
    }
    (devices, errors)
}

/// `netblk status` for people: a block per device, a line per node.
pub fn status_text(devices: &[serde_json::Value]) -> String {
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    for d in devices {
        out.push_str(&format!(
            "{}  volume {}  data path {}  state {}  queues {}\n",
            text(&d["device"]),
            text(&d["volume"]),
            text(&d["data_path"]),
            text(&d["state"]),
            text(&d["queues"])
        ));
        if let Some(err) = d["error"].as_str() {
            out.push_str(&format!("  {err}\n"));
        }
        let r = &d["replication"];
        if r.is_object() {
            out.push_str(&format!(
                "  replicas {}  membership generation {}  owner epoch {}{}\n",
                text(&r["replicas"]),
                text(&r["generation"]),
                text(&r["owner_epoch"]),
                if r["fenced"].as_bool() == Some(true) {
                    "  FENCED: another owner took the volume over"
                } else {
                    ""
                }
            ));
            let rec = &r["reconciled"];
            if rec.is_object() {
                out.push_str(&format!(
                    "  reconciled after an unclean stop: {} regions, {} bytes copied in {} ms\n",
                    text(&rec["regions"]),
                    text(&rec["bytes"]),
                    text(&rec["millis"])
                ));
            }
            for c in r["columns"].as_array().map_or(&[][..], Vec::as_slice) {
                let out_nodes: Vec<String> = c["out"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|o| {
                        format!(
                            "node {} out since {} (generation {}): {}",
                            text(&o["node"]),
                            text(&o["since_unix"]),
                            text(&o["generation"]),
                            text(&o["reason"])
                        )
                    })
                    .collect();
                let joining: Vec<String> = c["joining"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|j| {
                        let what = if j["rebuild"].as_bool() == Some(true) {
                            "rebuilding"
                        } else {
                            "catching up"
                        };
                        match (j["percent"].as_f64(), j["remaining_bytes"].as_u64()) {
                            (Some(pct), Some(left)) => format!(
                                "node {} {what} {pct:.1}% ({} MiB left, ETA {})",
                                text(&j["node"]),
                                left.div_ceil(1 << 20),
                                j["eta_s"]
                                    .as_f64()
                                    .map_or("-".into(), |s| format!("{s:.0} s"))
                            ),
                            _ => format!("node {} joining", text(&j["node"])),
                        }
                    })
                    .collect();
                let mut line = format!(
                    "  column {} {} in sync {}",
                    text(&c["column"]),
                    if c["degraded"].as_bool() == Some(true) {
                        "DEGRADED"
                    } else {
                        "whole"
                    },
                    text(&c["in_sync"]),
                );
                for part in joining.iter().chain(&out_nodes) {
                    line.push_str("; ");
                    line.push_str(part);
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        for n in d["nodes"].as_array().map_or(&[][..], Vec::as_slice) {
            let link = match (n["connected"].as_bool(), n["down_for_s"].as_f64()) {
                (Some(true), _) => "connected".to_string(),
                (Some(false), Some(s)) => format!("down for {s:.1} s"),
                (Some(false), None) => "down".to_string(),
                (None, _) => "-".to_string(),
            };
            let ms =
                |v: &serde_json::Value| v.as_f64().map_or("-".into(), |m| format!("{m:.2} ms"));
            out.push_str(&format!(
                "  node {} {:<21} {:<18} session {:<6} in flight {:<4} reconnects {:<4} p50 {:<10} p99 {:<10} last error {}\n",
                text(&n["node"]),
                text(&n["address"]),
                link,
                text(&n["session"]),
                text(&n["in_flight"]),
                text(&n["reconnects"]),
                ms(&n["p50_ms"]),
                ms(&n["p99_ms"]),
                match n["last_error"].as_str() {
                    Some("") | None => "-".to_string(),
                    Some(e) => e.to_string(),
                }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::QueueStats;

    #[test]
    fn status_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_path(dir.path(), 3);
        let queue = Arc::new(QueueStats::new(2));
        queue.node_up(0, 5, false);
        queue.node_up(1, 6, true);
        queue.node_down(1, Instant::now(), "connection reset");
        queue.nodes[0].piece_latency.record_ns(300_000);
        let source = Source {
            volume: "v".into(),
            device: "/dev/ublkb3".into(),
            nodes: vec![
                "127.0.0.1:7001".parse().expect("addr"),
                "127.0.0.1:7002".parse().expect("addr"),
            ],
            data_path: "copy".into(),
            queues: vec![queue],
            membership: None,
        };
        // A stand-in resize: from 100 bytes; a shrink below 100 wants force.
        let resize: ResizeFn = Box::new(|to, force| {
            if to < 100 && !force {
                Err("refused without --force".into())
            } else {
                Ok(100)
            }
        });
        // A stand-in scrub that takes a while.
        let scrub: ScrubFn = Arc::new(|repair| {
            std::thread::sleep(Duration::from_millis(500));
            Ok(serde_json::json!({ "chunks": 8, "repaired": u64::from(repair) }))
        });
        // A stand-in replace: node 7002 is member 1.
        let replace: ReplaceFn = Box::new(|old, _new| {
            if old.port() == 7002 {
                Ok(1)
            } else {
                Err(format!("{old} is not a member of this device"))
            }
        });
        let commands = Commands {
            resize: Some(resize),
            scrub: Some(scrub),
            replace: Some(replace),
        };
        serve(&path, source, commands).expect("serve");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let status = ask(&path, "status").expect("status");
        assert_eq!(status["device"], "/dev/ublkb3");
        assert_eq!(status["data_path"], "copy");
        assert_eq!(status["state"], "live");
        let nodes = status["nodes"].as_array().expect("nodes");
        assert_eq!(nodes[0]["connected"], true);
        assert_eq!(nodes[0]["session"], 5);
        assert!(
            nodes[0]["p50_ms"]
                .as_f64()
                .is_some_and(|ms| (0.2..=0.5).contains(&ms))
        );
        assert_eq!(nodes[1]["connected"], false);
        assert_eq!(nodes[1]["reconnects"], 1);
        assert_eq!(nodes[1]["last_error"], "connection reset");
        assert!(nodes[1]["down_for_s"].as_f64().is_some());
        let grown = ask(&path, "resize 200").expect("resize");
        assert_eq!(
            (grown["from"].as_u64(), grown["to"].as_u64()),
            (Some(100), Some(200))
        );
        let refused = ask(&path, "resize 50").expect("resize");
        assert_eq!(refused["error"], "refused without --force");
        let forced = ask(&path, "resize 50 force").expect("resize");
        assert_eq!(forced["to"], 50);
        // A scrub runs on its own thread: status answers meanwhile.
        let scrubbing = {
            let path = path.clone();
            std::thread::spawn(move || ask(&path, "scrub repair").expect("scrub"))
        };
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        ask(&path, "status").expect("status during a scrub");
        assert!(
            t0.elapsed() < Duration::from_millis(400),
            "status waited for the scrub"
        );
        let report = scrubbing.join().expect("scrub thread");
        assert_eq!(
            (report["chunks"].as_u64(), report["repaired"].as_u64()),
            (Some(8), Some(1))
        );
        let bad = ask(&path, "scrub now").expect("answer");
        assert_eq!(bad["error"], "usage: scrub [repair]");
        let replaced = ask(&path, "replace 127.0.0.1:7002 127.0.0.1:7009").expect("replace");
        assert_eq!(replaced["node"], 1);
        let refused = ask(&path, "replace 127.0.0.1:7005 127.0.0.1:7009").expect("replace");
        assert_eq!(
            refused["error"],
            "127.0.0.1:7005 is not a member of this device"
        );
        for bad in ["replace", "replace 127.0.0.1:7002", "replace a b"] {
            let answer = ask(&path, bad).expect("answer");
            assert_eq!(answer["error"], "usage: replace OLD_ADDR NEW_ADDR", "{bad}");
        }
        for bad in ["resize", "resize lots", "resize 50 now"] {
            let answer = ask(&path, bad).expect("answer");
            assert_eq!(answer["error"], "usage: resize BYTES [force]", "{bad}");
        }
        let bad = ask(&path, "launch").expect("answer");
        assert!(
            bad["error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown command"))
        );
    }
}

#[cfg(test)]
mod replication_tests {
    use super::*;
    use crate::layout::Replication;
    use crate::membership::{Membership, View};
    use crate::stats::QueueStats;

    #[test]
    fn status_shows_each_columns_replicas_and_who_left() {
        let r = Replication::new(4, 2).expect("2 columns x 2");
        let m = Membership::new(
            r,
            View {
                generation: 1,
                owner_epoch: 3,
                iss: vec![0b11, 0b11],
                joining: Vec::new(),
                fenced: false,
            },
        );
        m.report(3, "no answer within the replica timeout", Instant::now());
        m.set_reconciled(crate::reconcile::Reconciled {
            regions: 3,
            bytes: 12 << 20,
            millis: 40,
        });
        m.publish(View {
            generation: 2,
            owner_epoch: 3,
            iss: vec![0b11, 0b01],
            joining: Vec::new(),
            fenced: false,
        });
        let source = Source {
            volume: "v".into(),
            device: "/dev/ublkb4".into(),
            nodes: (1..=4)
                .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + p)))
                .collect(),
            data_path: "copy".into(),
            queues: vec![Arc::new(QueueStats::new(4))],
            membership: Some(m),
        };
        let status = source.status("live", &[], Instant::now());
        let rep = &status["replication"];
        assert_eq!(rep["generation"], 2);
        assert_eq!(rep["columns"][0]["degraded"], false);
        assert_eq!(rep["columns"][1]["degraded"], true);
        assert_eq!(rep["columns"][1]["in_sync"], serde_json::json!([1]));
        assert_eq!(rep["columns"][1]["out"][0]["node"], 3);
        assert_eq!(rep["reconciled"]["regions"], 3);
        let text = status_text(&[status]);
        assert!(
            text.contains("column 1 DEGRADED in sync [1]; node 3 out since"),
            "{text}"
        );
        assert!(
            text.contains("no answer within the replica timeout"),
            "{text}"
        );
        assert!(text.contains("column 0 whole in sync [0,2]"), "{text}");
        assert!(
            text.contains("reconciled after an unclean stop: 3 regions, 12582912 bytes"),
            "{text}"
        );
        // Node 3 answers again and catches up: a quarter copied in 5 s.
        let m = source.membership.as_ref().expect("membership");
        m.publish(View {
            generation: 3,
            owner_epoch: 3,
            iss: vec![0b11, 0b01],
            joining: vec![0, 0b10],
            fenced: false,
        });
        let now = Instant::now();
        m.set_progress(
            3,
            Some(crate::resync::Progress {
                rebuild: false,
                total: 100 << 20,
                done: 25 << 20,
                started: now - std::time::Duration::from_secs(5),
            }),
        );
        let status = source.status("live", &[], now);
        let column = &status["replication"]["columns"][1];
        assert_eq!(column["out"], serde_json::json!([]), "joining: not out");
        assert_eq!(column["joining"][0]["node"], 3);
        assert_eq!(column["joining"][0]["remaining_bytes"], 75u64 << 20);
        let text = status_text(&[status]);
        assert!(
            text.contains(
                "column 1 DEGRADED in sync [1]; node 3 catching up 25.0% (75 MiB left, ETA 15 s)"
            ),
            "{text}"
        );
    }
}

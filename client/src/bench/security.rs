//! `netblk bench --security`: what data digests and TLS cost. For each
//! workload, rounds of runs of netblk in plaintext, with CRC-32C digests
//! and (given TLS files) over mutual TLS, in an order that rotates each
//! round, on fresh connections to mock nodes of the same kind; each
//! protected run's figure as a ratio of the plaintext run of its round,
//! the median round reported. The plaintext run is the same operation over
//! the same connections without the protection: the upper bound.

use std::io;
use std::sync::Arc;

use super::{BenchOptions, Figures, Protect, Report, Workload, measure_workload, with_node_cpu};
use crate::mock::{MockNodes, mock_node_bin, start_mock_nodes};
use crate::net::ClientTls;
use crate::uring::SendMode;

/// One workload: plaintext, digests, TLS (if measured), each with its
/// ratio of plaintext (median over the rounds, with the lowest and highest).
#[derive(Debug, Clone)]
pub struct SecurityRow {
    pub workload: &'static str,
    pub mode: SendMode,
    pub plain: Figures,
    pub digest: Figures,
    pub digest_ratio: (f64, f64, f64),
    pub tls: Option<(Figures, (f64, f64, f64))>,
    /// How TLS records were encrypted (kernel or userspace).
    pub transport: &'static str,
    pub rounds: usize,
}

/// The median and the spread of `ratios`.
fn spread(mut ratios: Vec<f64>) -> (f64, f64, f64) {
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    (ratios[n / 2], ratios[0], ratios[n - 1])
}

fn mock_nodes(
    options: &BenchOptions,
    extra: &[&str],
) -> io::Result<(MockNodes, Vec<std::net::SocketAddr>)> {
    let bin = mock_node_bin(options.mock_node_bin.as_ref())?;
    start_mock_nodes(options.node_count, &bin, &options.node_store, extra)
}

/// Runs the comparison (mock nodes only: TLS nodes need the TLS files).
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> io::Result<Report> {
    if !options.nodes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--security starts its own mock nodes: leave out --nodes",
        ));
    }
    progress(&format!(
        "starting {} plaintext mock nodes (store {})",
        options.node_count, options.node_store
    ));
    let (plain_nodes, plain_addrs) = mock_nodes(options, &[])?;
    let tls = match &options.tls_dir {
        None => None,
        Some(dir) => {
            let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
            let (ca, cert, key) = (path("ca.pem"), path("node.pem"), path("node.key"));
            progress(&format!("starting {} TLS mock nodes", options.node_count));
            let nodes = mock_nodes(
                options,
                &[
                    "--tls-cert",
                    &cert,
                    "--tls-key",
                    &key,
                    "--tls-client-ca",
                    &ca,
                ],
            )?;
            let client = netblk_tls::config::Reloading::client(netblk_tls::config::ClientFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("client.pem"),
                key: dir.join("client.key"),
                danger_skip_server_name: false,
            })
            .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {why}")))?;
            Some((nodes, Arc::new(client)))
        }
    };
    let transport = if netblk_tls::ktls::available() {
        netblk_tls::Transport::Kernel.name()
    } else {
        netblk_tls::Transport::User.name()
    };
    let plain_spec = options.spec(plain_addrs.clone());
    let tls_spec = tls
        .as_ref()
        .map(|((_, addrs), _)| options.spec(addrs.clone()));
    let plain_pids = plain_nodes.pids();
    let tls_pids = tls.as_ref().map(|((n, _), _)| n.pids()).unwrap_or_default();
    let client_tls: Option<Arc<ClientTls>> = tls.as_ref().map(|(_, c)| Arc::clone(c));
    let mut rows = Vec::new();
    // Copy sends throughout: digests and TLS send copied (TLS must), so
    // plaintext does too, or its ratio would measure zero copy as well.
    let mode = SendMode::Copy;
    for &workload in &options.workloads {
        let figure = workload.figure();
        let mut runs: Vec<(Figures, Figures, Option<Figures>)> = Vec::new();
        for round in 0..options.rounds {
            let of = workload.round_label(round, options.rounds);
            let mut plain = None;
            let mut digest = None;
            let mut secured = None;
            for step in 0..3 {
                match (round + step) % 3 {
                    0 => {
                        progress(&format!("plaintext: {of}"));
                        plain = Some(measure(
                            options,
                            &plain_spec,
                            &plain_pids,
                            workload,
                            mode,
                            &Protect::default(),
                        )?);
                    }
                    1 => {
                        progress(&format!("crc32c digests: {of}"));
                        let protect = Protect {
                            digest: true,
                            tls: None,
                        };
                        digest = Some(measure(
                            options,
                            &plain_spec,
                            &plain_pids,
                            workload,
                            mode,
                            &protect,
                        )?);
                    }
                    _ => {
                        if let (Some(spec), Some(tls)) = (&tls_spec, &client_tls) {
                            progress(&format!("{transport}: {of}"));
                            let protect = Protect {
                                digest: false,
                                tls: Some(Arc::clone(tls)),
                            };
                            secured =
                                Some(measure(options, spec, &tls_pids, workload, mode, &protect)?);
                        }
                    }
                }
            }
            let (Some(plain), Some(digest)) = (plain, digest) else {
                return Err(io::Error::other("a round measured nothing"));
            };
            runs.push((plain, digest, secured));
        }
        let ratio = |f: &Figures, p: &Figures| figure(f) / figure(p).max(1e-9);
        let digest_ratio = spread(runs.iter().map(|(p, d, _)| ratio(d, p)).collect());
        let tls_ratio = client_tls.as_ref().map(|_| {
            spread(
                runs.iter()
                    .filter_map(|(p, _, t)| t.as_ref().map(|t| ratio(t, p)))
                    .collect(),
            )
        });
        // The round whose digest ratio is the median stands for the figures.
        let mid = runs
            .iter()
            .position(|(p, d, _)| ratio(d, p) == digest_ratio.0)
            .unwrap_or(0);
        let (plain, digest, secured) = runs.swap_remove(mid);
        rows.push(SecurityRow {
            workload: workload.name(),
            mode,
            plain,
            digest,
            digest_ratio,
            tls: secured.zip(tls_ratio),
            transport,
            rounds: options.rounds,
        });
    }
    drop(tls);
    Ok(Report {
        nodes: plain_addrs.len(),
        connections: plain_addrs.len() * options.queues,
        options: options.clone(),
        rows: Vec::new(),
        overhead: Vec::new(),
        security: rows,
        resync: Vec::new(),
    })
}

fn measure(
    options: &BenchOptions,
    spec: &crate::layout::VolumeSpec,
    pids: &[u32],
    workload: Workload,
    mode: SendMode,
    protect: &Protect,
) -> io::Result<Figures> {
    with_node_cpu(pids, || {
        measure_workload(spec, options, mode, workload, true, None, protect)
    })
}

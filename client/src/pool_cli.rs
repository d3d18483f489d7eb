//! `netblk pool` (check a pool file, preview a placement, list the
//! volumes on a pool, remove a node), and `netblk create` / `netblk
//! delete` of volumes placed over a pool.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use netblk::inquiry::Asker;
use netblk::net::{ClientTls, Timeouts};
use netblk::placement;
use netblk::pool::{Level, Pool};
use netblk::pooled::{self, NewVolume};

use crate::parse_size;

/// How long connecting and each answer may take, for the tools here.
const TIMEOUT: Duration = Duration::from_secs(5);
const TIMEOUTS: Timeouts = Timeouts {
    connect: TIMEOUT,
    io: TIMEOUT,
};
/// The client id the tools here present (their sessions are the clock's).
const CLIENT_ID: &str = "netblk-pool";

/// Mutual TLS to the pool's nodes (all three or none).
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// The CA the nodes' certificates must be signed by (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This client's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn load(&self) -> Result<Option<Arc<ClientTls>>, String> {
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            return Ok(None);
        };
        netblk_tls::config::Reloading::client(netblk_tls::config::ClientFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            danger_skip_server_name: false,
        })
        .map(|t| Some(Arc::new(t)))
        .map_err(|why| format!("TLS: {why}"))
    }
}

/// How a volume is laid over a pool's nodes.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Shape {
    /// Stripe columns.
    #[arg(long, default_value_t = 1)]
    columns: u32,
    /// Copies of every column (1 to 5), each on a node of another failure
    /// domain.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// The failure-domain level replicas of a column are kept apart at:
    /// zone, rack or host.
    #[arg(long, default_value = "host", value_parser = Level::parse)]
    spread: Level,
}

/// `netblk create`: a volume placed over a pool.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The pool file to place the volume on.
    #[arg(long, value_name = "FILE")]
    pool: PathBuf,
    /// The volume's name: what the placement hashes.
    #[arg(long)]
    volume: String,
    /// Size of the whole volume (bytes; K, M, G, T suffixes).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[command(flatten)]
    shape: Shape,
    /// Stripe unit (bytes; K, M suffixes): a power of two from 4K to 4M.
    #[arg(long, default_value = "128K", value_parser = crate::parse_stripe_unit)]
    stripe_unit: u32,
    #[command(flatten)]
    tls: TlsArgs,
}

/// `netblk delete`: a volume placed over a pool, with its data.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// The pool file the volume was created on.
    #[arg(long, value_name = "FILE")]
    pool: PathBuf,
    #[arg(long)]
    volume: String,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Validate a pool file and show its nodes, weights and failure
    /// domains. Exit status 1 (and the reason) if it is not valid.
    Check { file: PathBuf },
    /// Show which nodes a volume of this name would be placed on (a
    /// preview: nothing is created or contacted).
    Place {
        file: PathBuf,
        /// The volume's name: what the placement hashes.
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        shape: Shape,
    },
    /// List the volumes on the pool's nodes, each with its members as its
    /// placement record names them.
    Volumes {
        file: PathBuf,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Remove a node from a pool file: refused (exit status 1, with the
    /// volumes) while volumes use it (`netblk replace` moves them), or
    /// when it does not answer.
    Remove {
        file: PathBuf,
        /// The node: its name or its address, as the pool file lists it.
        node: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

pub fn run(cmd: PoolCmd) -> Result<(), String> {
    match cmd {
        PoolCmd::Check { file } => {
            let pool = Pool::load(&file)?;
            print!("{}: valid\n{}", file.display(), pool.summary());
            Ok(())
        }
        PoolCmd::Place {
            file,
            volume,
            shape:
                Shape {
                    columns,
                    replicas,
                    spread,
                },
        } => {
            let pool = Pool::load(&file)?;
            let placed = placement::place(&pool, &volume, columns, replicas, spread)?;
            println!(
                "volume '{volume}': {columns} column(s) × {replicas} replica(s), replicas apart by {}",
                spread.name()
            );
            for (c, column) in placed.columns.iter().enumerate() {
                let nodes: Vec<String> = column
                    .iter()
                    .map(|&i| {
                        let n = &pool.nodes[i];
                        format!(
                            "{} ({} {})",
                            n.address,
                            spread.name(),
                            n.domain(spread).unwrap_or("-")
                        )
                    })
                    .collect();
                println!("  column {c}: {}", nodes.join(", "));
            }
            Ok(())
        }
        PoolCmd::Volumes { file, tls } => volumes(&file, &tls),
        PoolCmd::Remove { file, node, tls } => remove(&file, &node, &tls),
    }
}

fn asker(tls: Option<&Arc<ClientTls>>) -> Asker<'_> {
    Asker {
        tls: tls.map(|t| &**t),
        timeout: TIMEOUT,
    }
}

pub fn create(args: CreateArgs) -> Result<(), String> {
    let pool = Pool::load(&args.pool)?;
    let tls = args.tls.load()?;
    let new = NewVolume {
        name: args.volume,
        size: args.size,
        columns: args.shape.columns,
        replicas: args.shape.replicas,
        spread: args.shape.spread,
        stripe_unit: args.stripe_unit,
    };
    let created = pooled::create(
        &pool,
        &new,
        &asker(tls.as_ref()),
        tls.clone(),
        CLIENT_ID,
        TIMEOUTS,
    )?;
    for why in &created.unreachable {
        eprintln!(
            "warning: a node of the pool did not answer (a volume of this name only on it would not be seen): {why}"
        );
    }
    let done = if created.existed {
        "exists already"
    } else {
        "created"
    };
    let l = &created.located;
    println!(
        "volume '{}' {done}: {} bytes, {} column(s) × {} replica(s), stripe unit {}",
        new.name, l.size, l.columns, l.replicas, l.stripe_unit
    );
    println!("nodes: {}", pooled::members(&l.nodes));
    Ok(())
}

pub fn delete(args: DeleteArgs) -> Result<(), String> {
    let pool = Pool::load(&args.pool)?;
    let tls = args.tls.load()?;
    let Some((volume, located)) =
        pooled::volume_ref(&pool, &args.volume, &asker(tls.as_ref()), tls.clone())?
    else {
        println!("no volume '{}' on the pool: nothing to delete", args.volume);
        return Ok(());
    };
    volume.delete(CLIENT_ID, TIMEOUTS)?;
    println!(
        "volume '{}' deleted from {}",
        args.volume,
        pooled::members(&located.nodes)
    );
    Ok(())
}

fn volumes(file: &std::path::Path, tls: &TlsArgs) -> Result<(), String> {
    let pool = Pool::load(file)?;
    let tls = tls.load()?;
    let listed = pooled::list(&pool, &asker(tls.as_ref()));
    for why in &listed.unreachable {
        eprintln!("not listed: {why}");
    }
    for (name, members) in &listed.volumes {
        match members {
            Some(nodes) => println!("{name}: {}", pooled::members(nodes)),
            None => println!("{name}: (no placement record)"),
        }
    }
    if listed.unreachable.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} node(s) of the pool did not answer: their volumes may be missing above",
            listed.unreachable.len()
        ))
    }
}

fn remove(file: &std::path::Path, node: &str, tls: &TlsArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read pool file {}: {e}", file.display()))?;
    let pool = Pool::parse(&text).map_err(|e| format!("pool file {}: {e}", file.display()))?;
    let index = pool
        .nodes
        .iter()
        .position(|n| n.name == node || n.address.to_string() == node)
        .ok_or_else(|| format!("pool file {} has no node '{node}'", file.display()))?;
    let tls = tls.load()?;
    let users = pooled::users(&pool, index, &asker(tls.as_ref()))?;
    let addr = pool.nodes[index].address;
    if !users.is_empty() {
        return Err(format!(
            "{node} ({addr}) is not removed: {} volume(s) use it: {} (move them with `netblk replace`, or delete them)",
            users.len(),
            users.join(", ")
        ));
    }
    let rest = netblk::pool::without_node(&text, &pool, index)
        .map_err(|why| format!("pool file {}: {why}", file.display()))?;
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, &rest)
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| format!("cannot write pool file {}: {e}", file.display()))?;
    println!(
        "{node} ({addr}) removed from {}: no volume uses it",
        file.display()
    );
    Ok(())
}

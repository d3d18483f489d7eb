//! `netblk pool`: check a pool file, and show where a volume would be
//! placed on it.

use std::path::PathBuf;

use clap::Subcommand;
use netblk::placement;
use netblk::pool::{Level, Pool};

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
        /// Stripe columns.
        #[arg(long, default_value_t = 1)]
        columns: u32,
        /// Copies of every column, each on a node of another failure
        /// domain.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// The failure-domain level replicas of a column are kept apart at:
        /// zone, rack or host.
        #[arg(long, default_value = "host", value_parser = Level::parse)]
        spread: Level,
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
            columns,
            replicas,
            spread,
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
    }
}

//! Pools (docs/placement.md): a StorageClass names one by its file in the
//! plugin's pool directory (a mounted ConfigMap); its volumes' nodes are
//! read from their placement records, never from the hash.

use std::path::PathBuf;
use std::time::Duration;

use netblk::inquiry::Asker;
use netblk::manage::VolumeRef;
use netblk::pool::Pool;

use crate::volume::{Tls, VolumeHandle, check_pool_name};

/// Where the pool files are (`--pool-dir`).
#[derive(Debug, Clone)]
pub struct Pools {
    pub dir: PathBuf,
}

/// The pool directory when none is given: where the DaemonSet and the
/// controller mount the `netblk-pools` ConfigMap.
pub const DEFAULT_DIR: &str = "/etc/netblk/pools";

/// How long an inquiry of one node may take.
const INQUIRY_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for Pools {
    fn default() -> Self {
        Pools {
            dir: PathBuf::from(DEFAULT_DIR),
        }
    }
}

impl Pools {
    /// The file of pool `name`.
    pub fn path(&self, name: &str) -> Result<PathBuf, String> {
        check_pool_name(name)?;
        Ok(self.dir.join(format!("{name}.toml")))
    }

    /// Pool `name`, read and checked.
    pub fn load(&self, name: &str) -> Result<Pool, String> {
        Pool::load(&self.path(name)?)
    }

    pub fn asker(tls: Option<&Tls>) -> Asker<'_> {
        Asker {
            tls: tls.map(|t| &**t),
            timeout: INQUIRY_TIMEOUT,
        }
    }

    /// The volume `handle` names as `netblk::manage` reaches it: a pool's
    /// from its placement record (None: no node of the pool has it), any
    /// other from its id.
    pub fn volume_ref(
        &self,
        handle: &VolumeHandle,
        tls: Option<&Tls>,
    ) -> Result<Option<VolumeRef>, String> {
        let Some(name) = &handle.pool else {
            return Ok(Some(handle.volume_ref(tls)));
        };
        let pool = self.load(name)?;
        Ok(
            netblk::pooled::volume_ref(&pool, &handle.name, &Pools::asker(tls), tls.cloned())?
                .map(|(volume, _)| volume),
        )
    }
}

//! Where a node keeps volume data: sparse memory, or one sparse file per
//! volume in a directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use netblk_protocol::pb;

/// Which store a node uses, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// Sparse, in memory; gone when the node exits.
    Memory,
    /// One sparse file per volume under this directory; survives restarts.
    Dir(PathBuf),
    /// Keeps nothing: writes are dropped, reads return zeroes. For
    /// benchmarks of the client and the network, not of a store.
    Null,
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "memory" => Ok(StoreKind::Memory),
            None if s == "null" => Ok(StoreKind::Null),
            Some(("dir", path)) if !path.is_empty() => Ok(StoreKind::Dir(PathBuf::from(path))),
            _ => Err(format!(
                "unknown store '{s}': expected 'memory', 'dir:PATH' or 'null'"
            )),
        }
    }
}

/// What a volume was created with; a later client must present the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeMeta {
    pub volume_size: u64,
    pub stripe_unit: u32,
    pub node_count: u32,
    pub node_index: u32,
    /// Copies of every column, and which one this node holds.
    pub replicas: u32,
    pub replica_index: u32,
}

impl VolumeMeta {
    /// A 64 MiB volume of one column with `replicas` copies, this node its
    /// first (tests).
    #[cfg(test)]
    pub(crate) fn one_column(replicas: u32) -> VolumeMeta {
        VolumeMeta {
            volume_size: 64 << 20,
            stripe_unit: 1 << 20,
            node_count: 1,
            node_index: 0,
            replicas,
            replica_index: 0,
        }
    }

    pub fn from_handshake(volume_size: u64, layout: &pb::Layout) -> Self {
        VolumeMeta {
            volume_size,
            stripe_unit: layout.stripe_unit,
            node_count: layout.node_count,
            node_index: layout.node_index,
            replicas: layout.replicas,
            replica_index: layout.replica_index,
        }
    }

    pub fn layout(&self) -> pb::Layout {
        pb::Layout {
            stripe_unit: self.stripe_unit,
            node_count: self.node_count,
            node_index: self.node_index,
            replicas: self.replicas,
            replica_index: self.replica_index,
        }
    }

    /// Bytes of the volume this node holds.
    pub fn capacity(&self) -> u64 {
        netblk_protocol::geometry::node_capacity(self.volume_size, &self.layout())
    }

    fn to_text(self, id: &str) -> String {
        format!(
            "netblk-volume 1\nvolume_size {}\nstripe_unit {}\nnode_count {}\nnode_index {}\nreplicas {}\nreplica_index {}\nid {id}\n",
            self.volume_size,
            self.stripe_unit,
            self.node_count,
            self.node_index,
            self.replicas,
            self.replica_index
        )
    }

    /// The metadata and the volume's id (None in files from before ids).
    fn parse(text: &str) -> Result<(Self, Option<String>), String> {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        let mut lines = text.lines();
        if lines.next() != Some("netblk-volume 1") {
            return Err("not a netblk volume metadata file (version 1)".into());
        }
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("malformed line '{line}'"))?;
            fields.insert(key, value);
        }
        let get = |key: &str| -> Result<u64, String> {
            let value = fields.get(key).ok_or_else(|| format!("missing '{key}'"))?;
            value
                .parse::<u64>()
                .map_err(|err| format!("bad '{key}' value '{value}': {err}"))
        };
        let small = |key: &str| -> Result<u32, String> {
            u32::try_from(get(key)?).map_err(|_| format!("'{key}' out of range"))
        };
        let id = fields
            .get("id")
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()))
            .map(|id| (*id).to_owned());
        if fields.contains_key("id") && id.is_none() {
            return Err("bad 'id'".into());
        }
        let meta = VolumeMeta {
            volume_size: get("volume_size")?,
            stripe_unit: small("stripe_unit")?,
            node_count: small("node_count")?,
            node_index: small("node_index")?,
            // Files from before replication: one copy.
            replicas: if fields.contains_key("replicas") {
                small("replicas")?
            } else {
                1
            },
            replica_index: if fields.contains_key("replica_index") {
                small("replica_index")?
            } else {
                0
            },
        };
        Ok((meta, id))
    }
}

impl std::fmt::Display for VolumeMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "size {} bytes, stripe unit {}, column {} of {}, replica {} of {}",
            self.volume_size,
            self.stripe_unit,
            self.node_index,
            self.node_count,
            self.replica_index,
            self.replicas
        )
    }
}

/// Zeroes to lend for ranges a store does not hold.
static ZEROS: [u8; MEMORY_CHUNK as usize] = [0; MEMORY_CHUNK as usize];

/// Bytes of a read lent by the store instead of copied out of it (they
/// stay valid while lent: a chunk written meanwhile is copied first).
pub enum Lent {
    Chunk(Arc<Box<[u8]>>, Range<usize>),
    /// This many zeroes (at most 64 KiB).
    Zeros(usize),
}

impl Lent {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Lent::Chunk(chunk, range) => &chunk[range.clone()],
            Lent::Zeros(n) => &ZEROS[..*n],
        }
    }
}

/// The data of one volume on this node. Offsets are node offsets, already
/// checked against the capacity by the caller.
pub trait Backend: Send + Sync {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The `len` bytes at `offset` as pieces of the store itself, for a
    /// reply sent without copying them; `None` where the store cannot lend
    /// (the caller then [`Backend::read`]s into a buffer of its own).
    fn lend(&self, _offset: u64, _len: usize) -> Option<Vec<Lent>> {
        None
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Frees the range; it reads back as zeroes. Serves discard and write-zeroes.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Bytes actually held (sparse ranges cost nothing).
    fn stored_bytes(&self) -> u64;
    /// The volume was resized from `old` to `new`: what lies beyond the
    /// smaller of the two capacities reads back as zeroes from now on, and
    /// a store that outlives the process keeps the new size.
    fn resize(&self, old: &VolumeMeta, new: &VolumeMeta) -> io::Result<()> {
        let (old, new) = (old.capacity(), new.capacity());
        if new < old {
            self.zero(new, old - new)
        } else {
            Ok(())
        }
    }
    /// The volume is deleted: a store that outlives the process forgets it
    /// (memory goes with the last reference).
    fn destroy(&self) -> io::Result<()> {
        Ok(())
    }
    /// The membership record a store that outlives the process kept (its
    /// encoded bytes); None where there is none or the store keeps none.
    fn load_record(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Keeps the membership record durably where the store outlives the
    /// process (written whole or not at all).
    fn store_record(&self, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// The activity log's regions a store that outlives the process kept
    /// (see `activity`); empty for the others.
    fn load_activity(&self) -> io::Result<Vec<u64>> {
        Ok(Vec::new())
    }
    /// Adds `regions` to the kept activity log, durably before it returns.
    fn append_activity(&self, _regions: &[u64]) -> io::Result<()> {
        Ok(())
    }
    /// Replaces the kept activity log by `regions` (whole or not at all).
    fn rewrite_activity(&self, _regions: &[u64]) -> io::Result<()> {
        Ok(())
    }
    /// The missed bitmaps a store that outlives the process kept (see
    /// `missed`); None where there are none.
    fn load_missed(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Keeps the missed bitmaps (whole or not at all).
    fn store_missed(&self, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

/// What the store holds of volume `name`, if it holds it beyond this
/// process (the directory store's metadata); None for the others, whose
/// volumes live only while the node runs.
pub fn stored_meta(kind: &StoreKind, name: &str) -> io::Result<Option<VolumeMeta>> {
    let StoreKind::Dir(dir) = kind else {
        return Ok(None);
    };
    let path = dir.join(format!("{name}.meta"));
    match std::fs::read_to_string(&path) {
        Ok(text) => VolumeMeta::parse(&text)
            .map(|(meta, _)| Some(meta))
            .map_err(|why| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {why}", path.display()),
                )
            }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// The names of the volumes a directory store holds (none for the others:
/// their volumes live only while open).
pub fn stored_names(kind: &StoreKind) -> io::Result<Vec<String>> {
    let StoreKind::Dir(dir) = kind else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(volume) = name.to_str().and_then(|n| n.strip_suffix(".meta")) {
            names.push(volume.to_owned());
        }
    }
    Ok(names)
}

/// Which volume a client talks to, and which life of it.
///
/// `id` is fixed when the volume is created (and persisted with it): a
/// different id under the same name means the volume was lost and made
/// anew. `incarnation` is new each time this process opens the volume: the
/// writes it acknowledged live in it until flushed. `durable_incarnation`
/// names an earlier incarnation whose every acknowledged write this store
/// made durable when it opened the volume (0: none), so a client that had
/// unflushed writes there lost nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub id: String,
    pub incarnation: u64,
    pub durable_incarnation: u64,
}

/// A random non-zero number, for identities and incarnations.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map(|()| u64::from_le_bytes(bytes))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()) << 40
        });
    random.max(1)
}

fn new_volume_id() -> String {
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// Opens a volume that exists in the store, or creates it. `Ok((backend,
/// meta, lineage))` carries the metadata the store holds, which the caller
/// compares with what the client asked for, and the volume's lineage.
pub fn open_or_create(
    kind: &StoreKind,
    name: &str,
    wanted: VolumeMeta,
) -> io::Result<(Box<dyn Backend>, VolumeMeta, Lineage)> {
    let fresh = || Lineage {
        id: new_volume_id(),
        incarnation: random_u64(),
        durable_incarnation: 0,
    };
    match kind {
        StoreKind::Memory => Ok((Box::new(MemoryBackend::new()), wanted, fresh())),
        StoreKind::Null => Ok((Box::new(NullBackend), wanted, fresh())),
        StoreKind::Dir(dir) => {
            let (backend, meta, lineage) = DirBackend::open_or_create(dir, name, wanted)?;
            Ok((Box::new(backend), meta, lineage))
        }
    }
}

/// This kernel's boot: the page cache (where acknowledged writes of an
/// earlier process wait) survives a process, not a reboot.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes `text` to `path` atomically and durably (temp file, fsync, rename,
/// fsync of the directory).
fn write_durably(dir: &Path, path: &Path, text: impl AsRef<[u8]>) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Calls `f(chunk index, offset in chunk, offset in range, length)` for each
/// `chunk`-sized piece of `[offset, offset + len)`.
fn for_each_chunk(offset: u64, len: u64, chunk: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut done = 0u64;
    while done < len {
        let pos = offset + done;
        let in_chunk = pos % chunk;
        let n = (chunk - in_chunk).min(len - done);
        f(pos / chunk, in_chunk as usize, done as usize, n as usize);
        done += n;
    }
}

/// Keeps nothing; see [`StoreKind::Null`].
struct NullBackend;

impl Backend for NullBackend {
    fn read(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn lend(&self, offset: u64, len: usize) -> Option<Vec<Lent>> {
        let mut pieces = Vec::new();
        for_each_chunk(offset, len as u64, MEMORY_CHUNK, |_, _, _, n| {
            pieces.push(Lent::Zeros(n));
        });
        Some(pieces)
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        Ok(())
    }
    fn zero(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn stored_bytes(&self) -> u64 {
        0
    }
}

const MEMORY_CHUNK: u64 = 64 << 10;
const MEMORY_SHARDS: usize = 64;

/// Sparse memory: 64 KiB chunks allocated on first write, freed by discard.
/// A memory store's chunks by number.
type Chunks = HashMap<u64, Arc<Box<[u8]>>>;

struct MemoryBackend {
    /// Chunks by number; a chunk lent to a reply being sent is shared, and
    /// a write to it then changes a copy (`Arc::make_mut`).
    shards: Vec<Mutex<Chunks>>,
    stored: AtomicU64,
}

impl MemoryBackend {
    fn new() -> Self {
        MemoryBackend {
            shards: (0..MEMORY_SHARDS).map(|_| Mutex::default()).collect(),
            stored: AtomicU64::new(0),
        }
    }

    fn shard(&self, chunk: u64) -> std::sync::MutexGuard<'_, Chunks> {
        // A panic while holding a shard lock cannot leave a chunk half-valid in a
        // way that matters more than the panic itself: keep serving.
        self.shards[(chunk % MEMORY_SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn lend(&self, offset: u64, len: usize) -> Option<Vec<Lent>> {
        let mut pieces = Vec::new();
        for_each_chunk(offset, len as u64, MEMORY_CHUNK, |chunk, at, _, n| {
            pieces.push(match self.shard(chunk).get(&chunk) {
                Some(data) => Lent::Chunk(Arc::clone(data), at..at + n),
                None => Lent::Zeros(n),
            });
        });
        Some(pieces)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for_each_chunk(
            offset,
            buf.len() as u64,
            MEMORY_CHUNK,
            |chunk, at, pos, n| {
                let out = &mut buf[pos..pos + n];
                match self.shard(chunk).get(&chunk) {
                    Some(data) => out.copy_from_slice(&data[at..at + n]),
                    None => out.fill(0),
                }
            },
        );
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        for_each_chunk(
            offset,
            data.len() as u64,
            MEMORY_CHUNK,
            |chunk, at, pos, n| {
                let mut shard = self.shard(chunk);
                let stored = shard.entry(chunk).or_insert_with(|| {
                    self.stored.fetch_add(MEMORY_CHUNK, Ordering::Relaxed);
                    Arc::new(vec![0u8; MEMORY_CHUNK as usize].into_boxed_slice())
                });
                Arc::make_mut(stored)[at..at + n].copy_from_slice(&data[pos..pos + n]);
            },
        );
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        for_each_chunk(offset, len, MEMORY_CHUNK, |chunk, at, _, n| {
            let mut shard = self.shard(chunk);
            if n as u64 == MEMORY_CHUNK {
                if shard.remove(&chunk).is_some() {
                    self.stored.fetch_sub(MEMORY_CHUNK, Ordering::Relaxed);
                }
            } else if let Some(data) = shard.get_mut(&chunk) {
                Arc::make_mut(data)[at..at + n].fill(0);
            }
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn stored_bytes(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }
}

/// One sparse file per volume (`NAME.vol`) with its metadata beside it
/// (`NAME.meta`). Flush and FUA writes are `fdatasync`ed before the reply.
struct DirBackend {
    file: File,
    dir: PathBuf,
    meta_path: PathBuf,
    id: String,
}

impl DirBackend {
    fn open_or_create(
        dir: &Path,
        name: &str,
        wanted: VolumeMeta,
    ) -> io::Result<(Self, VolumeMeta, Lineage)> {
        let data_path = dir.join(format!("{name}.vol"));
        let meta_path = dir.join(format!("{name}.meta"));
        let (file, meta, id) = match std::fs::read_to_string(&meta_path) {
            Ok(text) => {
                let (meta, id) = VolumeMeta::parse(&text).map_err(|why| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {why}", meta_path.display()),
                    )
                })?;
                let file = OpenOptions::new().read(true).write(true).open(&data_path)?;
                if file.metadata()?.len() > meta.capacity() {
                    // A resize stopped half way (see `resize`): the metadata
                    // says what the client was told, or what it was not yet.
                    file.set_len(meta.capacity())?;
                    file.sync_all()?;
                }
                if file.metadata()?.len() != meta.capacity() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is {} bytes, its metadata says {}",
                            data_path.display(),
                            file.metadata()?.len(),
                            meta.capacity()
                        ),
                    ));
                }
                let id = match id {
                    Some(id) => id,
                    None => {
                        // A volume from before ids: it gets one now, for good.
                        let id = new_volume_id();
                        write_durably(dir, &meta_path, meta.to_text(&id))?;
                        id
                    }
                };
                (file, meta, id)
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // Data file first, metadata last: a volume only exists once its
                // metadata is durably in place.
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&data_path)?;
                file.set_len(wanted.capacity())?;
                file.sync_all()?;
                let id = new_volume_id();
                write_durably(dir, &meta_path, wanted.to_text(&id))?;
                (file, wanted, id)
            }
            Err(err) => return Err(err),
        };
        let backend = DirBackend {
            file,
            dir: dir.to_path_buf(),
            meta_path,
            id: id.clone(),
        };
        let durable_incarnation = backend.take_over(dir, name)?;
        let lineage = Lineage {
            id,
            incarnation: random_u64(),
            durable_incarnation,
        };
        backend.record_incarnation(dir, name, lineage.incarnation)?;
        Ok((backend, meta, lineage))
    }

    /// Makes every write of the process that had this volume open before
    /// durable (they reached the page cache; on the same boot they are still
    /// there), and returns that process's incarnation: none of what it
    /// acknowledged is lost.
    fn take_over(&self, dir: &Path, name: &str) -> io::Result<u64> {
        let path = dir.join(format!("{name}.incarnation"));
        let previous = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let mut words = previous.split_whitespace();
        let (Some(boot), Some(incarnation)) = (words.next(), words.next()) else {
            return Ok(0);
        };
        if boot != boot_id() || boot.is_empty() {
            return Ok(0);
        }
        self.file.sync_data()?;
        Ok(incarnation.parse().unwrap_or(0))
    }

    fn record_incarnation(&self, dir: &Path, name: &str, incarnation: u64) -> io::Result<()> {
        let path = dir.join(format!("{name}.incarnation"));
        write_durably(dir, &path, format!("{} {incarnation}\n", boot_id()))
    }

    fn write_zeroes_slowly(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.file
                .write_all_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}

impl Backend for DirBackend {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is
        // owned by `self.file` and open for the whole call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The file system cannot punch holes: zero the range the slow way.
            Some(libc::EOPNOTSUPP) => self.write_zeroes_slowly(offset, len),
            _ => Err(err),
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn stored_bytes(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Metadata first (without it the volume does not exist), then its
    /// data and incarnation record.
    fn destroy(&self) -> io::Result<()> {
        let gone = |path: &Path| match std::fs::remove_file(path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        };
        gone(&self.meta_path)?;
        File::open(&self.dir)?.sync_all()?;
        gone(&self.meta_path.with_extension("vol"))?;
        gone(&self.meta_path.with_extension("record"))?;
        gone(&self.meta_path.with_extension("activity"))?;
        gone(&self.meta_path.with_extension("missed"))?;
        gone(&self.meta_path.with_extension("incarnation"))
    }

    fn load_record(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.meta_path.with_extension("record")) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn store_record(&self, bytes: &[u8]) -> io::Result<()> {
        write_durably(&self.dir, &self.meta_path.with_extension("record"), bytes)
    }

    /// The log file holds one little-endian u64 a region; a torn last
    /// entry (a crash during an append) is ignored: what it logged was not
    /// applied.
    fn load_activity(&self) -> io::Result<Vec<u64>> {
        match std::fs::read(self.meta_path.with_extension("activity")) {
            Ok(bytes) => Ok(bytes
                .chunks_exact(8)
                .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
                .collect()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(err),
        }
    }

    fn append_activity(&self, regions: &[u64]) -> io::Result<()> {
        let path = self.meta_path.with_extension("activity");
        let created = !path.exists();
        let mut file = OpenOptions::new().append(true).create(true).open(&path)?;
        // A torn entry from a crash would shift every later one: it goes
        // (the request it logged was never applied).
        let len = file.metadata()?.len();
        if len % 8 != 0 {
            file.set_len(len - len % 8)?;
        }
        let mut bytes = Vec::with_capacity(regions.len() * 8);
        bytes.extend(regions.iter().flat_map(|r| r.to_le_bytes()));
        file.write_all(&bytes)?;
        file.sync_data()?;
        if created {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    fn rewrite_activity(&self, regions: &[u64]) -> io::Result<()> {
        let bytes: Vec<u8> = regions.iter().flat_map(|r| r.to_le_bytes()).collect();
        write_durably(&self.dir, &self.meta_path.with_extension("activity"), bytes)
    }

    fn load_missed(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.meta_path.with_extension("missed")) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn store_missed(&self, bytes: &[u8]) -> io::Result<()> {
        write_durably(&self.dir, &self.meta_path.with_extension("missed"), bytes)
    }

    /// The data file's length and the metadata, in the order that lets a
    /// crash half way be finished at the next open, which trims the file to
    /// the metadata: growing, the file grows first (a crash then leaves the
    /// old size, which the client was not told had changed); shrinking, the
    /// metadata goes first (a crash then finishes the shrink).
    fn resize(&self, old: &VolumeMeta, new: &VolumeMeta) -> io::Result<()> {
        let meta = new.to_text(&self.id);
        if new.capacity() >= old.capacity() {
            self.file.set_len(new.capacity())?;
            self.file.sync_all()?;
            write_durably(&self.dir, &self.meta_path, &meta)
        } else {
            write_durably(&self.dir, &self.meta_path, &meta)?;
            self.file.set_len(new.capacity())?;
            self.file.sync_all()
        }
    }
}

/// Page size of the volatile write cache.
const CACHE_PAGE: u64 = 4096;

/// A disk's volatile write cache in front of a store: writes are held in
/// memory and reach the store only on FLUSH (or, for their own data, with
/// FUA); a crash or `kill -9` loses what was not flushed. Lets tests check
/// that a client's completed flush really covered its completed writes.
///
/// One lock serializes everything: a read must not see the store between a
/// flush's write-back and the removal of the pages it wrote.
pub struct VolatileCache {
    inner: Box<dyn Backend>,
    /// Bytes of the volume here: the last page may be short.
    capacity: AtomicU64,
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl VolatileCache {
    pub fn new(inner: Box<dyn Backend>, capacity: u64) -> Self {
        VolatileCache {
            inner,
            capacity: AtomicU64::new(capacity),
            pages: Mutex::new(HashMap::new()),
        }
    }

    fn page_len(&self, page: u64) -> usize {
        (self
            .capacity
            .load(Ordering::Relaxed)
            .saturating_sub(page * CACHE_PAGE))
        .min(CACHE_PAGE) as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for VolatileCache {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let pages = self.lock();
        self.inner.read(offset, buf)?;
        for_each_chunk(offset, buf.len() as u64, CACHE_PAGE, |page, at, done, n| {
            if let Some(cached) = pages.get(&page) {
                buf[done..done + n].copy_from_slice(&cached[at..at + n]);
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let mut pages = self.lock();
        let mut result = Ok(());
        for_each_chunk(
            offset,
            data.len() as u64,
            CACHE_PAGE,
            |page, at, done, n| {
                if result.is_err() {
                    return;
                }
                let cached = match pages.entry(page) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let mut fresh = vec![0u8; self.page_len(page)].into_boxed_slice();
                        if n < fresh.len() {
                            // A partial page starts from what the store holds.
                            if let Err(err) = self.inner.read(page * CACHE_PAGE, &mut fresh) {
                                result = Err(err);
                                return;
                            }
                        }
                        e.insert(fresh)
                    }
                };
                cached[at..at + n].copy_from_slice(&data[done..done + n]);
            },
        );
        result?;
        if fua {
            // Forced unit access: this write's data is durable before the reply.
            self.inner.write(offset, data, true)?;
            self.inner.flush()?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut pages = self.lock();
        for_each_chunk(offset, len, CACHE_PAGE, |page, at, _, n| {
            if n == self.page_len(page) {
                pages.remove(&page);
            } else if let Some(cached) = pages.get_mut(&page) {
                cached[at..at + n].fill(0);
            }
        });
        self.inner.zero(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        let mut pages = self.lock();
        let mut order: Vec<(&u64, &Box<[u8]>)> = pages.iter().collect();
        order.sort_unstable_by_key(|(page, _)| **page);
        for (page, data) in order {
            self.inner.write(page * CACHE_PAGE, data, false)?;
        }
        // Written back (a failure above keeps them all cached, still dirty).
        pages.clear();
        drop(pages);
        self.inner.flush()
    }

    fn stored_bytes(&self) -> u64 {
        self.inner.stored_bytes() + self.lock().len() as u64 * CACHE_PAGE
    }

    /// Cached pages take the new page lengths: the last one may grow (with
    /// zeroes) or shrink, and pages past the end go.
    fn resize(&self, old: &VolumeMeta, new: &VolumeMeta) -> io::Result<()> {
        let mut pages = self.lock();
        self.capacity.store(new.capacity(), Ordering::Relaxed);
        pages.retain(|page, _| self.page_len(*page) > 0);
        for (page, data) in pages.iter_mut() {
            let len = self.page_len(*page);
            if data.len() != len {
                let mut fitted = vec![0u8; len];
                let keep = len.min(data.len());
                fitted[..keep].copy_from_slice(&data[..keep]);
                *data = fitted.into_boxed_slice();
            }
        }
        self.inner.resize(old, new)
    }

    fn destroy(&self) -> io::Result<()> {
        self.lock().clear();
        self.inner.destroy()
    }

    // The record is metadata, never held in the volatile cache.
    fn load_record(&self) -> io::Result<Option<Vec<u8>>> {
        self.inner.load_record()
    }

    fn store_record(&self, bytes: &[u8]) -> io::Result<()> {
        self.inner.store_record(bytes)
    }

    // So is the activity log.
    fn load_activity(&self) -> io::Result<Vec<u64>> {
        self.inner.load_activity()
    }

    fn append_activity(&self, regions: &[u64]) -> io::Result<()> {
        self.inner.append_activity(regions)
    }

    fn rewrite_activity(&self, regions: &[u64]) -> io::Result<()> {
        self.inner.rewrite_activity(regions)
    }

    fn load_missed(&self) -> io::Result<Option<Vec<u8>>> {
        self.inner.load_missed()
    }

    fn store_missed(&self, bytes: &[u8]) -> io::Result<()> {
        self.inner.store_missed(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(volume_size: u64) -> VolumeMeta {
        VolumeMeta {
            volume_size,
            stripe_unit: 65536,
            node_count: 1,
            node_index: 0,
            replicas: 1,
            replica_index: 0,
        }
    }

    fn exercise(backend: &dyn Backend) {
        let mut buf = vec![1u8; 200_000];
        backend.read(12_345, &mut buf).expect("read");
        assert!(buf.iter().all(|b| *b == 0), "never-written reads as zeroes");

        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        backend.write(12_345, &data, true).expect("write");
        backend.read(12_345, &mut buf).expect("read");
        assert_eq!(buf, data);

        backend.zero(20_000, 150_000).expect("zero");
        backend.read(12_345, &mut buf).expect("read");
        let z = 20_000 - 12_345;
        assert_eq!(&buf[..z], &data[..z]);
        assert!(buf[z..z + 150_000].iter().all(|b| *b == 0));
        assert_eq!(&buf[z + 150_000..], &data[z + 150_000..]);
        backend.flush().expect("flush");
    }

    #[test]
    fn lent_reads_are_the_data_and_keep_it_while_a_write_changes_it() {
        let backend = MemoryBackend::new();
        backend.write(65536 - 4, &[1; 8], false).expect("write");
        let joined = |pieces: &[Lent]| -> Vec<u8> {
            pieces.iter().flat_map(|p| p.bytes().to_vec()).collect()
        };
        // Across a chunk boundary, with a hole after it.
        let lent = backend
            .lend(65536 - 8, 16 + 65536)
            .expect("a memory store lends");
        let mut want = vec![0u8; 16 + 65536];
        want[4..12].fill(1);
        assert_eq!(joined(&lent), want);
        // A write to a lent chunk changes a copy: the reply being sent
        // keeps what was read, the next read sees the write.
        backend.write(65536 - 4, &[2; 4], false).expect("write");
        assert_eq!(joined(&lent), want);
        let mut now = vec![0u8; 8];
        backend.read(65536 - 8, &mut now).expect("read");
        assert_eq!(now, [0, 0, 0, 0, 2, 2, 2, 2]);
        // The null store lends zeroes.
        let zeros = NullBackend.lend(12345, 200_000).expect("zeroes");
        assert_eq!(joined(&zeros), vec![0; 200_000]);
    }

    #[test]
    fn memory_backend_reads_writes_and_frees() {
        let backend = MemoryBackend::new();
        exercise(&backend);
        let before = backend.stored_bytes();
        backend.zero(0, 1 << 20).expect("zero");
        assert!(backend.stored_bytes() < before);
        assert_eq!(backend.stored_bytes(), 0);
    }

    #[test]
    fn dir_backend_reads_writes_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backend, got, first) =
            DirBackend::open_or_create(dir.path(), "v", meta(1 << 20)).expect("create");
        assert_eq!(got, meta(1 << 20));
        assert_eq!(first.durable_incarnation, 0, "a new volume has no past");
        exercise(&backend);
        drop(backend);
        let (_, got, second) =
            DirBackend::open_or_create(dir.path(), "v", meta(2 << 20)).expect("reopen");
        assert_eq!(
            got,
            meta(1 << 20),
            "the stored metadata wins; the caller compares"
        );
        assert_eq!(second.id, first.id, "the identity is the volume's for good");
        assert_ne!(
            second.incarnation, first.incarnation,
            "a new incarnation per open"
        );
        assert_eq!(
            second.durable_incarnation, first.incarnation,
            "the first process's writes were made durable at reopen"
        );
        // Another volume has another identity.
        let (_, _, other) =
            DirBackend::open_or_create(dir.path(), "w", meta(1 << 20)).expect("create w");
        assert_ne!(other.id, first.id);
    }

    #[test]
    fn a_resize_cut_short_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backend, _, _) =
            DirBackend::open_or_create(dir.path(), "v", meta(1 << 20)).expect("create");
        backend
            .resize(&meta(1 << 20), &meta(4 << 20))
            .expect("grow");
        drop(backend);
        let (backend, got, _) =
            DirBackend::open_or_create(dir.path(), "v", meta(4 << 20)).expect("reopen");
        assert_eq!(got, meta(4 << 20), "a finished resize is kept");
        // A grow that crashed after the file grew, before the metadata: the
        // old size stands, the file is trimmed back to it.
        backend.file.set_len(8 << 20).expect("grow the file only");
        drop(backend);
        let (backend, got, _) =
            DirBackend::open_or_create(dir.path(), "v", meta(4 << 20)).expect("reopen");
        assert_eq!(got, meta(4 << 20));
        assert_eq!(backend.file.metadata().expect("len").len(), 4 << 20);
        // A file shorter than its metadata is not something a resize leaves.
        backend.file.set_len(1 << 20).expect("shrink the file only");
        drop(backend);
        assert!(DirBackend::open_or_create(dir.path(), "v", meta(4 << 20)).is_err());
    }

    #[test]
    fn an_incarnation_of_another_boot_is_not_vouched_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backend, _, first) =
            DirBackend::open_or_create(dir.path(), "v", meta(1 << 20)).expect("create");
        drop(backend);
        std::fs::write(
            dir.path().join("v.incarnation"),
            format!("another-boot {}\n", first.incarnation),
        )
        .expect("fake a reboot");
        let (_, _, second) =
            DirBackend::open_or_create(dir.path(), "v", meta(1 << 20)).expect("reopen");
        assert_eq!(second.id, first.id);
        assert_eq!(
            second.durable_incarnation, 0,
            "the page cache did not survive"
        );
    }

    #[test]
    fn store_kind_parses() {
        assert_eq!("memory".parse(), Ok(StoreKind::Memory));
        assert_eq!(
            "dir:/tmp/x".parse(),
            Ok(StoreKind::Dir(PathBuf::from("/tmp/x")))
        );
        assert_eq!("null".parse(), Ok(StoreKind::Null));
        assert!("dir:".parse::<StoreKind>().is_err());
        assert!("disk".parse::<StoreKind>().is_err());
    }

    #[test]
    fn metadata_round_trips_and_rejects_junk() {
        let m = meta(123 * 512);
        assert_eq!(
            VolumeMeta::parse(&m.to_text("00ff")),
            Ok((m, Some("00ff".to_owned())))
        );
        assert!(VolumeMeta::parse(&m.to_text("not hex")).is_err());
        assert!(VolumeMeta::parse("").is_err());
        assert!(VolumeMeta::parse("netblk-volume 1\nvolume_size x\n").is_err());
        assert!(VolumeMeta::parse("netblk-volume 1\nvolume_size 5\n").is_err());
    }

    #[test]
    fn volatile_cache_keeps_writes_from_the_store_until_flush() {
        let cache = VolatileCache::new(Box::new(MemoryBackend::new()), 3 * 4096 + 512);
        let inner_of = |c: &VolatileCache, offset: u64, len: usize| {
            let mut buf = vec![0u8; len];
            c.inner.read(offset, &mut buf).expect("read store");
            buf
        };
        // Unaligned, spanning pages, including the short last page.
        cache.write(4000, &[7; 8000], false).expect("write");
        cache
            .write(3 * 4096, &[9; 512], false)
            .expect("write last page");
        let mut seen = vec![0u8; 8000];
        cache.read(4000, &mut seen).expect("read");
        assert_eq!(seen, vec![7; 8000]);
        assert_eq!(
            inner_of(&cache, 4000, 8000),
            vec![0; 8000],
            "not yet durable"
        );
        // FUA makes its own data durable at once.
        cache.write(0, &[5; 512], true).expect("fua write");
        assert_eq!(inner_of(&cache, 0, 512), vec![5; 512]);
        // Zeroing reaches the store and the cache.
        cache.zero(4096, 4096).expect("zero");
        let mut zeroed = vec![1u8; 4096];
        cache.read(4096, &mut zeroed).expect("read zeroed");
        assert_eq!(zeroed, vec![0; 4096]);
        cache.flush().expect("flush");
        let mut want = vec![0u8; 3 * 4096 + 512];
        want[..512].fill(5);
        want[4000..4096].fill(7);
        want[8192..12000].fill(7);
        want[3 * 4096..].fill(9);
        assert_eq!(inner_of(&cache, 0, want.len()), want);
        assert_eq!(cache.lock().len(), 0);
    }
}

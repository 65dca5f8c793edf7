//! [`DiskTier`]: encodings kept on disk in a redb database, so that they survive a
//! restart and are shared by the processes of one machine.
//!
//! - **Crash safety.** Every batch of entries is one redb write transaction, committed
//!   with an fsync; redb's copy-on-write B-trees make a commit all or nothing, so a
//!   process killed mid-write leaves the database as it was before that batch. Each
//!   value also carries its length and a blake3 checksum, checked on every read: an
//!   entry that does not verify is a miss (and counted), never a wrong result.
//! - **Several processes.** redb takes an exclusive file lock while a database is
//!   open. The tier opens the file for each batch of lookups or writes and closes it
//!   after, waiting (up to [`LOCK_WAIT`]) while another process holds it; within a
//!   process a mutex serialises the batches.
//! - **No eviction.** The file grows with what is written; `clear()` empties it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::Serialize;

use super::ContentKey;
use crate::error::{MlmfError, Result};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mlmf-entries-v1");
const MAGIC: &[u8; 6] = b"MLMF1\0";

/// How long a batch waits for another process to release the database.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Counters of a [`DiskTier`].
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DiskStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries written.
    pub writes: u64,
    /// Entries that failed their checksum (treated as misses).
    pub corrupt: u64,
    /// Batches skipped because the database stayed locked or could not be used.
    pub unavailable: u64,
    /// Bytes of the database file.
    pub file_bytes: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    corrupt: AtomicU64,
    unavailable: AtomicU64,
}

/// An on-disk table of tensors by [`ContentKey`]; see the module docs.
pub struct DiskTier {
    path: PathBuf,
    lock: Mutex<()>,
    counters: Counters,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn disk_err(path: &Path, what: impl std::fmt::Display) -> MlmfError {
    MlmfError::Cache {
        cache: format!("disk ({})", path.display()),
        message: what.to_string(),
    }
}

impl DiskTier {
    /// Opens (creating when missing) the database at `path`, checking it can be used.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| disk_err(&path, format!("cannot create its folder: {e}")))?;
        }
        let tier = Self {
            path,
            lock: Mutex::new(()),
            counters: Counters::default(),
        };
        // Create the table once, so that readers find it.
        tier.with_db(|db| {
            let txn = db.begin_write().map_err(|e| disk_err(&tier.path, e))?;
            txn.open_table(TABLE).map_err(|e| disk_err(&tier.path, e))?;
            txn.commit().map_err(|e| disk_err(&tier.path, e))
        })?;
        Ok(tier)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the open database: the process-wide mutex, then the file lock
    /// (waiting while another process holds it).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        let db = loop {
            match Database::create(&self.path) {
                Ok(db) => break db,
                Err(DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(disk_err(&self.path, e)),
            }
        };
        f(&db)
    }

    /// The values of `keys` (`None` for absent or unreadable entries), placed on
    /// `device`. A database that cannot be opened counts as all misses.
    pub fn get_many(&self, keys: &[ContentKey], device: &Device) -> Vec<Option<Vec<Tensor>>> {
        let read = self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| disk_err(&self.path, e))?;
            let table = txn.open_table(TABLE).map_err(|e| disk_err(&self.path, e))?;
            keys.iter()
                .map(|k| {
                    let got = table.get(&k.0[..]).map_err(|e| disk_err(&self.path, e))?;
                    Ok(got.map(|v| v.value().to_vec()))
                })
                .collect::<Result<Vec<_>>>()
        });
        let raw = match read {
            Ok(raw) => raw,
            Err(_) => {
                self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .misses
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
                return vec![None; keys.len()];
            }
        };
        raw.into_iter()
            .map(|bytes| {
                let value = bytes.and_then(|b| match decode(&b, device) {
                    Some(v) => Some(v),
                    None => {
                        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                });
                let c = if value.is_some() {
                    &self.counters.hits
                } else {
                    &self.counters.misses
                };
                c.fetch_add(1, Ordering::Relaxed);
                value
            })
            .collect()
    }

    /// Writes `entries` in one transaction (all or nothing).
    pub fn put_many(&self, entries: &[(ContentKey, Vec<Tensor>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let encoded = entries
            .iter()
            .map(|(k, ts)| Ok((k, encode(ts)?)))
            .collect::<Result<Vec<_>>>()?;
        let res = self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| disk_err(&self.path, e))?;
            {
                let mut table = txn.open_table(TABLE).map_err(|e| disk_err(&self.path, e))?;
                for (k, v) in &encoded {
                    table
                        .insert(&k.0[..], &v[..])
                        .map_err(|e| disk_err(&self.path, e))?;
                }
            }
            txn.commit().map_err(|e| disk_err(&self.path, e))
        });
        match res {
            Ok(()) => {
                self.counters
                    .writes
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Entries held, and how many of them fail their checksum.
    pub fn verify(&self) -> Result<(u64, u64)> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| disk_err(&self.path, e))?;
            let table = txn.open_table(TABLE).map_err(|e| disk_err(&self.path, e))?;
            let mut n = 0;
            let mut bad = 0;
            for row in table.iter().map_err(|e| disk_err(&self.path, e))? {
                let (_, v) = row.map_err(|e| disk_err(&self.path, e))?;
                n += 1;
                if checked_payload(v.value()).is_none() {
                    bad += 1;
                }
            }
            Ok((n, bad))
        })
    }

    /// Number of entries.
    pub fn len(&self) -> Result<u64> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| disk_err(&self.path, e))?;
            let table = txn.open_table(TABLE).map_err(|e| disk_err(&self.path, e))?;
            table.len().map_err(|e| disk_err(&self.path, e))
        })
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Drops every entry.
    pub fn clear(&self) -> Result<()> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| disk_err(&self.path, e))?;
            txn.delete_table(TABLE)
                .map_err(|e| disk_err(&self.path, e))?;
            txn.open_table(TABLE).map_err(|e| disk_err(&self.path, e))?;
            txn.commit().map_err(|e| disk_err(&self.path, e))
        })
    }

    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        DiskStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            file_bytes: std::fs::metadata(&self.path).map_or(0, |m| m.len()),
        }
    }

    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in [&c.hits, &c.misses, &c.writes, &c.corrupt, &c.unavailable] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

fn dtype_code(d: DType) -> Option<u8> {
    Some(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U8 => 3,
        _ => return None,
    })
}

fn code_dtype(c: u8) -> Option<DType> {
    Some(match c {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        3 => DType::U8,
        _ => return None,
    })
}

/// `MAGIC | payload length u64 | blake3(payload) | payload`; the payload is, per
/// tensor: dtype code, rank, dims (u64 each), then the data (f32 for float dtypes,
/// bytes for u8), little-endian.
fn encode(tensors: &[Tensor]) -> Result<Vec<u8>> {
    let f = |e: candle_core::Error| MlmfError::Internal(format!("disk cache encode: {e}"));
    let mut payload = Vec::new();
    payload.push(tensors.len() as u8);
    for t in tensors {
        let code = dtype_code(t.dtype()).ok_or_else(|| {
            MlmfError::Internal(format!("disk cache: dtype {:?} not stored", t.dtype()))
        })?;
        payload.push(code);
        payload.push(t.rank() as u8);
        for &d in t.dims() {
            payload.extend_from_slice(&(d as u64).to_le_bytes());
        }
        let flat = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .map_err(f)?;
        if t.dtype() == DType::U8 {
            payload.extend_from_slice(&flat.to_vec1::<u8>().map_err(f)?);
        } else {
            let v = flat
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(f)?;
            payload.extend_from_slice(bytemuck::cast_slice(&v));
        }
    }
    let mut out = Vec::with_capacity(payload.len() + 46);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The payload of a stored value when its length and checksum hold.
fn checked_payload(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(&MAGIC[..])?;
    let (len, rest) = rest.split_at_checked(8)?;
    let len = u64::from_le_bytes(len.try_into().ok()?) as usize;
    let (hash, payload) = rest.split_at_checked(32)?;
    (payload.len() == len && blake3::hash(payload).as_bytes() == hash).then_some(payload)
}

fn decode(bytes: &[u8], device: &Device) -> Option<Vec<Tensor>> {
    let p = checked_payload(bytes)?;
    let (&n, mut p) = p.split_first()?;
    let mut out = Vec::with_capacity(n as usize);
    let take = |p: &mut &[u8], k: usize| -> Option<Vec<u8>> {
        let (a, b) = p.split_at_checked(k)?;
        *p = b;
        Some(a.to_vec())
    };
    for _ in 0..n {
        let head = take(&mut p, 2)?;
        let dtype = code_dtype(head[0])?;
        let dims = (0..head[1])
            .map(|_| {
                let b = take(&mut p, 8)?;
                Some(u64::from_le_bytes(b.try_into().ok()?) as usize)
            })
            .collect::<Option<Vec<usize>>>()?;
        let count: usize = dims.iter().product();
        let t = if dtype == DType::U8 {
            Tensor::from_vec(take(&mut p, count)?, dims, device).ok()?
        } else {
            let raw = take(&mut p, count * 4)?;
            let v: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Tensor::from_vec(v, dims, device)
                .and_then(|t| t.to_dtype(dtype))
                .ok()?
        };
        out.push(t);
    }
    p.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Fingerprint;
    use crate::modality::Modality;

    fn key(i: u32) -> ContentKey {
        let fp = Fingerprint::of(&0).unwrap();
        ContentKey::of_bytes(Modality::Text, "m", &fp, &i.to_le_bytes())
    }

    fn tensors(i: u32) -> Vec<Tensor> {
        let d = &Device::Cpu;
        vec![
            Tensor::arange(0f32, 8.0, d)
                .unwrap()
                .affine(1.0, f64::from(i))
                .unwrap(),
            Tensor::ones((3, 4), DType::F32, d).unwrap(),
            Tensor::from_vec(vec![1u8, 1, 0], 3, d).unwrap(),
        ]
    }

    #[test]
    fn round_trip_and_checksums() {
        let dir = std::env::temp_dir().join(format!("mlmf-disk-{}", std::process::id()));
        let path = dir.join("cache.redb");
        let tier = DiskTier::open(&path).unwrap();
        tier.put_many(&[(key(1), tensors(1)), (key(2), tensors(2))])
            .unwrap();
        let got = tier.get_many(&[key(1), key(3), key(2)], &Device::Cpu);
        assert!(got[1].is_none());
        for (g, i) in [(&got[0], 1), (&got[2], 2)] {
            let g = g.as_ref().unwrap();
            for (a, b) in g.iter().zip(tensors(i)) {
                assert_eq!(a.dims(), b.dims());
                assert_eq!(a.dtype(), b.dtype());
                let diff = a
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sub(&b.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0);
            }
        }
        assert_eq!(tier.verify().unwrap(), (2, 0));
        let s = tier.stats();
        assert_eq!((s.hits, s.misses, s.writes), (2, 1, 2));
        // A second handle (as another process would open it) sees the entries.
        let other = DiskTier::open(&path).unwrap();
        assert_eq!(other.len().unwrap(), 2);
        // A damaged value fails its checksum: a miss, counted, never a wrong result.
        let mut bad = encode(&tensors(4)).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode(&bad, &Device::Cpu).is_none());
        assert!(decode(&bad[..10], &Device::Cpu).is_none());
        tier.clear().unwrap();
        assert!(tier.is_empty().unwrap());
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Training data, encoded once: per modality, each row's pooled vector (in memory)
//! and, where a token-level fusion or an attention pair needs them, its token states
//! (appended to a file while the rows are encoded, then memory-mapped: the token
//! states of a large dataset stay on disk and the page cache holds what is used).
//!
//! Rows may lack a modality; a batch marks those rows absent. Batches are assembled
//! here as padded tensors.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::fusion::ModIn;
use crate::encoders::layers::ce;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::model::ItemEncoding;

/// A row's supervision and name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    /// Named in error messages.
    pub id: Option<String>,
    /// Class index for a classification objective.
    pub label: Option<i64>,
    /// Values for a regression objective.
    pub target: Option<Vec<f32>>,
}

/// One row's encoding of one modality.
#[derive(Debug, Clone)]
pub struct RowData {
    /// `[D']`, the pooled embedding.
    pub pooled: Vec<f32>,
    /// `[T, D]` token states with their `[T]` 0/1 mask, when known.
    pub tokens: Option<(Vec<f32>, Vec<u8>)>,
}

impl RowData {
    /// From an encoding the model computed.
    pub fn from_item(e: &ItemEncoding) -> Result<Self> {
        let f = ce("item encoding");
        Ok(Self {
            pooled: e
                .pooled
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec1())
                .map_err(&f)?,
            tokens: Some((
                e.hidden
                    .to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .map_err(&f)?,
                e.mask
                    .to_dtype(DType::U8)
                    .and_then(|t| t.to_vec1())
                    .map_err(&f)?,
            )),
        })
    }
}

/// What a dataset keeps of one modality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub modality: Modality,
    /// Width of the pooled embedding.
    pub pooled_width: usize,
    /// Width of the token states.
    pub token_width: usize,
    /// Whether token states are kept.
    pub tokens: bool,
}

struct TokenWriter {
    path: PathBuf,
    out: BufWriter<File>,
    offsets: Vec<u64>,
    mask: Vec<u8>,
}

struct ModBuild {
    layout: Layout,
    pooled: Vec<f32>,
    present: Vec<bool>,
    tokens: Option<TokenWriter>,
}

/// Collects rows into a [`Dataset`].
pub struct DatasetBuilder {
    origin: String,
    dir: PathBuf,
    temporary: bool,
    examples: Vec<Example>,
    mods: Vec<ModBuild>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> MlmfError {
    MlmfError::Cache {
        cache: "training data".into(),
        message: format!("{}: {e}", path.display()),
    }
}

impl DatasetBuilder {
    /// A builder keeping `layout`; token files go to `dir` (a fresh temporary folder,
    /// removed with the dataset, when `None`). `origin` names the data in errors.
    pub fn new(origin: &str, layout: &[Layout], dir: Option<&Path>) -> Result<Self> {
        let (dir, temporary) = match dir {
            Some(d) => (d.to_path_buf(), false),
            None => {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (
                    std::env::temp_dir().join(format!("mlmf-data-{}-{n}", std::process::id())),
                    true,
                )
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let mods = layout
            .iter()
            .map(|l| {
                let tokens = if l.tokens {
                    let path = dir.join(format!(
                        "tokens-{}.f32",
                        l.modality.name().replace(':', "-")
                    ));
                    let file = File::create(&path).map_err(|e| io_err(&path, e))?;
                    Some(TokenWriter {
                        path,
                        out: BufWriter::with_capacity(1 << 20, file),
                        offsets: vec![0],
                        mask: Vec::new(),
                    })
                } else {
                    None
                };
                Ok(ModBuild {
                    layout: *l,
                    pooled: Vec::new(),
                    present: Vec::new(),
                    tokens,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            origin: origin.to_string(),
            dir,
            temporary,
            examples: Vec::new(),
            mods,
        })
    }

    /// Rows so far.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Appends one row: its supervision and what it carries of each modality
    /// (modalities outside the layout are an error; absent ones are simply missing).
    pub fn push(&mut self, example: Example, data: BTreeMap<Modality, RowData>) -> Result<()> {
        let row = self.examples.len();
        let err = |field: &str, message: String| {
            let mut e = MlmfError::data(self.origin.clone(), Some(row), Some(field), message);
            if let MlmfError::Data { id, .. } = &mut e {
                id.clone_from(&example.id);
            }
            e
        };
        for m in data.keys() {
            if !self.mods.iter().any(|b| b.layout.modality == *m) {
                let known: Vec<String> = self
                    .mods
                    .iter()
                    .map(|b| b.layout.modality.to_string())
                    .collect();
                return Err(err(
                    &m.to_string(),
                    format!(
                        "the model has no `{m}` modality (it has {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        // Check everything before writing anything.
        for b in &self.mods {
            let m = b.layout.modality;
            let Some(d) = data.get(&m) else { continue };
            let pw = b.layout.pooled_width;
            if d.pooled.len() != pw {
                return Err(err(
                    &m.to_string(),
                    format!("pooled embedding {} wide, expected {pw}", d.pooled.len()),
                ));
            }
            if d.pooled.iter().any(|v| !v.is_finite()) {
                return Err(err(
                    &m.to_string(),
                    "the embedding holds NaN or infinity".into(),
                ));
            }
            if b.tokens.is_some() {
                let tw = b.layout.token_width;
                match &d.tokens {
                    Some((x, mask)) => {
                        if mask.is_empty() || x.len() != mask.len() * tw {
                            return Err(err(
                                &m.to_string(),
                                format!(
                                    "token states of {} values for {} tokens, expected {tw} per token",
                                    x.len(),
                                    mask.len()
                                ),
                            ));
                        }
                        if x.iter().any(|v| !v.is_finite()) {
                            return Err(err(&m.to_string(), "the token states hold NaN or infinity".into()));
                        }
                    }
                    None if pw == tw => {}
                    None => {
                        return Err(err(
                            &m.to_string(),
                            format!("token states [T, {tw}] are needed (a token-level fusion or an attention pair), only a pooled embedding was given"),
                        ))
                    }
                }
            }
        }
        for b in &mut self.mods {
            let m = b.layout.modality;
            let d = data.get(&m);
            match d {
                Some(d) => b.pooled.extend_from_slice(&d.pooled),
                None => b.pooled.resize(b.pooled.len() + b.layout.pooled_width, 0.0),
            }
            b.present.push(d.is_some());
            if let Some(w) = &mut b.tokens {
                let (x, mask): (&[f32], Vec<u8>) = match d {
                    Some(RowData {
                        tokens: Some((x, mask)),
                        ..
                    }) => (x, mask.clone()),
                    Some(RowData {
                        pooled,
                        tokens: None,
                    }) => (pooled, vec![1]),
                    None => (&[], Vec::new()),
                };
                w.out
                    .write_all(bytemuck::cast_slice(x))
                    .map_err(|e| io_err(&w.path, e))?;
                let last = *w.offsets.last().unwrap_or(&0);
                w.offsets.push(last + mask.len() as u64);
                w.mask.extend_from_slice(&mask);
            }
        }
        self.examples.push(example);
        Ok(())
    }

    /// The finished dataset (token files flushed and memory-mapped).
    pub fn finish(self) -> Result<Dataset> {
        let mut mods = BTreeMap::new();
        for b in self.mods {
            let tokens = match b.tokens {
                None => None,
                Some(w) => {
                    let written = w.out.into_inner().map_err(|e| io_err(&w.path, e.error()))?;
                    written.sync_all().map_err(|e| io_err(&w.path, e))?;
                    drop(written);
                    let file = File::open(&w.path).map_err(|e| io_err(&w.path, e))?;
                    let len = file.metadata().map_err(|e| io_err(&w.path, e))?.len();
                    let data = if len == 0 {
                        None
                    } else {
                        // SAFETY: the file was written by this builder and is not
                        // modified while mapped (it lives in the dataset's folder).
                        Some(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(&w.path, e))?)
                    };
                    Some(TokenData {
                        width: b.layout.token_width,
                        offsets: w.offsets,
                        mask: w.mask,
                        data,
                    })
                }
            };
            mods.insert(
                b.layout.modality,
                ModData {
                    layout: b.layout,
                    pooled: b.pooled,
                    present: b.present,
                    tokens,
                },
            );
        }
        Ok(Dataset {
            origin: self.origin,
            examples: self.examples,
            mods,
            dir: self.dir,
            temporary: self.temporary,
        })
    }
}

struct TokenData {
    width: usize,
    /// Row `r`'s tokens are `offsets[r]..offsets[r + 1]`.
    offsets: Vec<u64>,
    mask: Vec<u8>,
    data: Option<memmap2::Mmap>,
}

impl TokenData {
    fn values(&self) -> &[f32] {
        self.data.as_deref().map_or(&[], bytemuck::cast_slice)
    }
}

struct ModData {
    layout: Layout,
    pooled: Vec<f32>,
    present: Vec<bool>,
    tokens: Option<TokenData>,
}

/// Encoded rows; see the module docs.
pub struct Dataset {
    origin: String,
    examples: Vec<Example>,
    mods: BTreeMap<Modality, ModData>,
    dir: PathBuf,
    temporary: bool,
}

impl Drop for Dataset {
    fn drop(&mut self) {
        if self.temporary {
            // The maps are dropped with the fields; on Linux the files can go first.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("origin", &self.origin)
            .field("rows", &self.len())
            .field("modalities", &self.mods.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Names the data in errors (a file, `arrays`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// How many rows carry `m`.
    pub fn count(&self, m: Modality) -> usize {
        self.mods
            .get(&m)
            .map_or(0, |d| d.present.iter().filter(|&&p| p).count())
    }

    /// Whether row `r` carries `m`.
    pub fn has(&self, m: Modality, r: usize) -> bool {
        self.mods.get(&m).is_some_and(|d| d.present[r])
    }

    /// Bytes of token states on disk and of pooled vectors in memory.
    pub fn bytes(&self) -> (u64, u64) {
        let disk = self
            .mods
            .values()
            .filter_map(|d| d.tokens.as_ref())
            .map(|t| t.values().len() as u64 * 4)
            .sum();
        let mem = self.mods.values().map(|d| d.pooled.len() as u64 * 4).sum();
        (disk, mem)
    }

    fn presence(d: &ModData, rows: &[usize], dev: &Device) -> Result<(Tensor, Vec<bool>)> {
        let host: Vec<bool> = rows.iter().map(|&r| d.present[r]).collect();
        let v: Vec<f32> = host.iter().map(|&p| f32::from(u8::from(p))).collect();
        let t = Tensor::from_vec(v, (rows.len(), 1), dev).map_err(ce("batch"))?;
        Ok((t, host))
    }

    /// Pooled embeddings of `rows` `[B, D']` (`None` when no row carries `m`).
    pub(crate) fn pooled(
        &self,
        m: Modality,
        rows: &[usize],
        dev: &Device,
    ) -> Result<Option<ModIn>> {
        let Some(d) = self.mods.get(&m) else {
            return Ok(None);
        };
        if !rows.iter().any(|&r| d.present[r]) {
            return Ok(None);
        }
        let w = d.layout.pooled_width;
        let mut v = Vec::with_capacity(rows.len() * w);
        for &r in rows {
            v.extend_from_slice(&d.pooled[r * w..(r + 1) * w]);
        }
        let x = Tensor::from_vec(v, (rows.len(), w), dev).map_err(ce("batch"))?;
        let (present, host) = Self::presence(d, rows, dev)?;
        Ok(Some(ModIn {
            x,
            mask: None,
            present,
            rows: host,
        }))
    }

    /// Token states of `rows` padded to the longest, `[B, T, D]` with a `[B, T]` mask
    /// (`None` when no row carries `m`).
    pub(crate) fn tokens(
        &self,
        m: Modality,
        rows: &[usize],
        dev: &Device,
    ) -> Result<Option<ModIn>> {
        let Some(d) = self.mods.get(&m) else {
            return Ok(None);
        };
        let Some(t) = &d.tokens else {
            return Err(MlmfError::Internal(format!(
                "{m}: token states were not kept"
            )));
        };
        if !rows.iter().any(|&r| d.present[r]) {
            return Ok(None);
        }
        let len = |r: usize| (t.offsets[r + 1] - t.offsets[r]) as usize;
        let longest = rows.iter().map(|&r| len(r)).max().unwrap_or(1).max(1);
        let w = t.width;
        let values = t.values();
        // Each row's tokens, then zeros up to the longest (no zero-fill underneath).
        let mut x = Vec::with_capacity(rows.len() * longest * w);
        let mut mask = vec![0f32; rows.len() * longest];
        for (i, &r) in rows.iter().enumerate() {
            let (s, n) = (t.offsets[r] as usize, len(r));
            x.extend_from_slice(&values[s * w..(s + n) * w]);
            x.resize((i + 1) * longest * w, 0.0);
            for (k, &mv) in t.mask[s..s + n].iter().enumerate() {
                mask[i * longest + k] = f32::from(mv);
            }
        }
        let x = Tensor::from_vec(x, (rows.len(), longest, w), dev).map_err(ce("batch"))?;
        let mask = Tensor::from_vec(mask, (rows.len(), longest), dev).map_err(ce("batch"))?;
        let (present, host) = Self::presence(d, rows, dev)?;
        Ok(Some(ModIn {
            x,
            mask: Some(mask),
            present,
            rows: host,
        }))
    }
}

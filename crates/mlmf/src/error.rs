//! The one error type of the core, [`MlmfError`].
//!
//! Every message says what was wrong, where (modality, input index, config field path)
//! and what was expected. The Python layer maps each variant onto the `mlmf.*Error`
//! hierarchy in exactly one place (`python/errors.rs`).

use std::path::PathBuf;

use crate::modality::Modality;

/// Result alias used across the crate.
pub type Result<T, E = MlmfError> = std::result::Result<T, E>;

/// Everything that can go wrong in mlmf.
#[derive(Debug, thiserror::Error)]
pub enum MlmfError {
    /// A configuration value is invalid. `path` is the dotted field path,
    /// e.g. `modalities.image.preprocessing.size`.
    #[error("invalid config at `{path}`: {message}")]
    Config { path: String, message: String },

    /// A configuration file could not be read or parsed.
    #[error("cannot parse config file {path}: {message}")]
    ConfigFile { path: PathBuf, message: String },

    /// An input has the wrong type, shape, dtype or value.
    #[error("{} input{}: {message}", .modality, fmt_index(.index))]
    Input {
        modality: Modality,
        index: Option<usize>,
        message: String,
    },

    /// An input's bytes could not be decoded (corrupt, truncated, unsupported format).
    #[error("{} input{}: cannot decode: {message}", .modality, fmt_index(.index))]
    Decode {
        modality: Modality,
        index: Option<usize>,
        message: String,
    },

    /// A file could not be read.
    #[error("{} input{}: cannot read {path}: {source}", .modality, fmt_index(.index))]
    Io {
        modality: Modality,
        index: Option<usize>,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model, tokenizer or processor could not be loaded from disk.
    #[error("cannot load {what} from {path}: {message}")]
    ModelLoad {
        what: String,
        path: PathBuf,
        message: String,
    },

    /// A modality the call needs was not given.
    #[error("missing modality `{modality}`: {message}")]
    MissingModality { modality: Modality, message: String },

    /// The requested device is not available in this build or on this machine.
    #[error("device `{device}` unavailable: {message}")]
    Device { device: String, message: String },

    /// A row of a dataset is malformed: a missing or unknown field, a label out of
    /// range, a target of the wrong width. `origin` names the data (a file, `arrays`).
    #[error("{origin}{}: {message}", fmt_row(.row, .id, .field))]
    Data {
        origin: String,
        row: Option<usize>,
        id: Option<String>,
        field: Option<String>,
        message: String,
    },

    /// Training cannot go on (a non-finite loss or gradient, nothing to train); the
    /// last good checkpoint is kept.
    #[error("training failed: {0}")]
    Train(String),

    /// A cache cannot do what was asked (e.g. an unusable disk tier).
    #[error("{cache} cache: {message}")]
    Cache { cache: String, message: String },

    /// A bug: an internal invariant did not hold (also what a caught panic becomes).
    #[error("internal error: {0}")]
    Internal(String),
}

fn fmt_row(row: &Option<usize>, id: &Option<String>, field: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(r) = row {
        s.push_str(&format!(" row {r}"));
    }
    if let Some(i) = id {
        s.push_str(&format!(" (id {i:?})"));
    }
    if let Some(f) = field {
        s.push_str(&format!(" field `{f}`"));
    }
    s
}

fn fmt_index(index: &Option<usize>) -> String {
    match index {
        Some(i) => format!(" {i}"),
        None => String::new(),
    }
}

impl MlmfError {
    /// An [`MlmfError::Config`] at a dotted field path.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An [`MlmfError::Input`] for `modality`, input `index` unknown yet.
    pub fn input(modality: Modality, message: impl Into<String>) -> Self {
        Self::Input {
            modality,
            index: None,
            message: message.into(),
        }
    }

    /// An [`MlmfError::Data`] about `field` of `row` in `origin` (a file, `arrays`).
    pub fn data(
        origin: impl Into<String>,
        row: Option<usize>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self::Data {
            origin: origin.into(),
            row,
            id: None,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    /// An [`MlmfError::Decode`] for `modality`, input `index` unknown yet.
    pub fn decode(modality: Modality, message: impl Into<String>) -> Self {
        Self::Decode {
            modality,
            index: None,
            message: message.into(),
        }
    }

    /// An [`MlmfError::ModelLoad`].
    pub fn model_load(
        what: impl Into<String>,
        path: impl Into<PathBuf>,
        message: impl Into<String>,
    ) -> Self {
        Self::ModelLoad {
            what: what.into(),
            path: path.into(),
            message: message.into(),
        }
    }

    /// Attaches the position of the failing input in its batch, for errors raised by
    /// code that handles one item and does not know where it sits.
    /// An index already set is kept (the innermost caller knows best).
    /// An equal error for one more receiver: a failure several waiting callers share
    /// (a computation the cache ran once for all of them). The I/O source becomes
    /// text.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::Config { path, message } => Self::config(path.clone(), message.clone()),
            Self::ConfigFile { path, message } => Self::ConfigFile {
                path: path.clone(),
                message: message.clone(),
            },
            Self::Input {
                modality,
                index,
                message,
            } => Self::Input {
                modality: *modality,
                index: *index,
                message: message.clone(),
            },
            Self::Decode {
                modality,
                index,
                message,
            } => Self::Decode {
                modality: *modality,
                index: *index,
                message: message.clone(),
            },
            Self::Io {
                modality,
                index,
                path,
                source,
            } => Self::Io {
                modality: *modality,
                index: *index,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Self::ModelLoad {
                what,
                path,
                message,
            } => Self::model_load(what.clone(), path.clone(), message.clone()),
            Self::MissingModality { modality, message } => Self::MissingModality {
                modality: *modality,
                message: message.clone(),
            },
            Self::Device { device, message } => Self::Device {
                device: device.clone(),
                message: message.clone(),
            },
            Self::Cache { cache, message } => Self::Cache {
                cache: cache.clone(),
                message: message.clone(),
            },
            Self::Data {
                origin,
                row,
                id,
                field,
                message,
            } => Self::Data {
                origin: origin.clone(),
                row: *row,
                id: id.clone(),
                field: field.clone(),
                message: message.clone(),
            },
            Self::Train(m) => Self::Train(m.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
        }
    }

    pub fn at_index(mut self, i: usize) -> Self {
        if let Self::Input { index, .. } | Self::Decode { index, .. } | Self::Io { index, .. } =
            &mut self
        {
            index.get_or_insert(i);
        }
        self
    }

    /// Prefixes a config error's field path with `prefix` (`preprocessing` ->
    /// `modalities.image.preprocessing`), so nested `validate()` calls compose.
    pub fn under(self, prefix: &str) -> Self {
        match self {
            Self::Config { path, message } => Self::Config {
                path: if path.is_empty() {
                    prefix.to_string()
                } else {
                    format!("{prefix}.{path}")
                },
                message,
            },
            other => other,
        }
    }
}

/// Attach an input index to the error of a per-item result.
pub(crate) trait AtIndex<T> {
    fn at_index(self, i: usize) -> Result<T>;
}

impl<T> AtIndex<T> for Result<T> {
    fn at_index(self, i: usize) -> Result<T> {
        self.map_err(|e| e.at_index(i))
    }
}

/// Runs `f`, turning a panic (a bug here or in a library fed malformed data) into
/// [`MlmfError::Internal`] prefixed with `context`, so that no panic unwinds further.
pub(crate) fn catch_panic<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(MlmfError::Internal(format!("{context}: {what}")))
    })
}

/// Read a whole file, mapping failure to [`MlmfError::Io`] for `modality`.
pub(crate) fn read_file(modality: Modality, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| MlmfError::Io {
        modality,
        index: None,
        path: path.to_path_buf(),
        source,
    })
}

/// candle errors inside a forward pass are bugs or resource failures, not bad input
/// (inputs are validated before): they surface as internal errors naming the op.
pub(crate) fn ce(context: &'static str) -> impl Fn(candle_core::Error) -> MlmfError {
    move |e| MlmfError::Internal(format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_modality_index_and_expectation() {
        let e = MlmfError::input(Modality::Image, "expected 3 channels, got 5").at_index(4);
        assert_eq!(e.to_string(), "image input 4: expected 3 channels, got 5");
        let e = MlmfError::decode(Modality::Audio, "truncated stream");
        assert_eq!(
            e.to_string(),
            "audio input: cannot decode: truncated stream"
        );
    }

    #[test]
    fn inner_index_wins() {
        let e = MlmfError::input(Modality::Video, "x")
            .at_index(2)
            .at_index(7);
        assert!(e.to_string().starts_with("video input 2:"));
    }

    #[test]
    fn config_paths_compose() {
        let e = MlmfError::config("size", "must be > 0")
            .under("preprocessing")
            .under("modalities.image");
        assert_eq!(
            e.to_string(),
            "invalid config at `modalities.image.preprocessing.size`: must be > 0"
        );
    }
}

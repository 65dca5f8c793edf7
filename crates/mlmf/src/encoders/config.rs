//! Reading a checkpoint's `config.json` field by field, with the defaults of the
//! matching transformers config class, and errors that name the field.

use serde_json::Value;

use crate::error::{MlmfError, Result};

/// A view of one (sub-)object of `config.json`; `path` is its dotted location.
#[derive(Clone, Copy)]
pub(crate) struct Cfg<'a> {
    value: &'a Value,
    path: &'a str,
}

static EMPTY: Value = Value::Null;

impl<'a> Cfg<'a> {
    pub fn new(value: &'a Value, path: &'a str) -> Self {
        Self { value, path }
    }

    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            format!("config.json: {key}")
        } else {
            format!("config.json: {}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A nested object (`text_config`); a missing one reads as all defaults.
    pub fn sub(&self, key: &'a str) -> Cfg<'a> {
        Cfg {
            value: self.get(key).unwrap_or(&EMPTY),
            path: key,
        }
    }

    /// A positive integer field (zero is rejected: every size here must be >= 1).
    pub fn size(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if (1..=(1 << 24)).contains(&n) => Ok(n as usize),
                _ => Err(MlmfError::config(
                    self.field(key),
                    format!("expected an integer between 1 and 16777216, got {v}"),
                )),
            },
        }
    }

    /// An optional non-negative integer field (token ids).
    pub fn id(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                MlmfError::config(self.field(key), format!("expected an integer, got {v}"))
            }),
        }
    }

    /// A positive float field.
    pub fn positive(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(x),
                _ => Err(MlmfError::config(
                    self.field(key),
                    format!("expected a positive number, got {v}"),
                )),
            },
        }
    }

    pub fn boolean(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                MlmfError::config(self.field(key), format!("expected true or false, got {v}"))
            }),
        }
    }

    pub fn string(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| {
                MlmfError::config(self.field(key), format!("expected a string, got {v}"))
            }),
        }
    }

    /// A list of positive integers (`conv_dim`); every entry as [`Cfg::size`] checks.
    pub fn sizes(&self, key: &str, default: &[usize]) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(default.to_vec()),
            Some(v) => v
                .as_array()
                .filter(|a| !a.is_empty())
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().filter(|n| (1..=(1 << 24)).contains(n)))
                        .map(|n| n.map(|n| n as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    MlmfError::config(
                        self.field(key),
                        format!("expected a non-empty list of integers >= 1, got {v}"),
                    )
                }),
        }
    }

    /// The dotted name of `key` for error messages.
    pub fn name(&self, key: &str) -> String {
        self.field(key)
    }
}

//! What `mlmf serve` can be told: address, limits, batching, security.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{MlmfError, Result};

/// The server's settings; [`ServeSettings::default`] is safe to expose on loopback.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Address to bind; `127.0.0.1` unless told otherwise.
    pub host: String,
    /// Port; 0 picks a free one (the bound address is reported).
    pub port: u16,
    /// Bearer token every `/v1/*` and `/metrics` request must carry, when set.
    pub api_key: Option<String>,
    /// Directories whose files requests may name by path (after resolving links);
    /// empty: media only by value.
    pub allow_paths: Vec<PathBuf>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests admitted at once (queued or running); past it the answer is 429.
    pub max_concurrent_requests: usize,
    /// A request still unanswered after this long gets 503 and its queued work is
    /// dropped.
    pub request_timeout: Duration,
    /// Coalesce concurrent requests' items per modality into one encoder batch.
    pub batching: bool,
    /// Largest encoder batch, in items.
    pub max_batch_items: usize,
    /// Largest text batch, in tokens (after truncation).
    pub max_batch_tokens: usize,
    /// How long a batch waits for more items after its first one arrives. 0 (the
    /// default): a batch takes what is queued when the encoder is free, so a lone
    /// request waits for nothing and requests arriving while a batch runs form the next.
    pub max_wait: Duration,
    /// How long SIGTERM (or `shutdown`) waits for requests in flight before closing.
    pub drain_timeout: Duration,
    /// The model name `/v1/models` lists and `/v1/embeddings` accepts (besides the
    /// modality names and each modality's checkpoint name).
    pub model_name: String,
    /// Drain on SIGTERM and SIGINT (the command line); off for servers started from
    /// code, which stop through their handle.
    pub handle_signals: bool,
    /// Tokio worker threads for HTTP and JSON (the models run on their own threads).
    pub http_threads: usize,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            allow_paths: Vec::new(),
            max_body_bytes: 32 << 20,
            max_concurrent_requests: 512,
            request_timeout: Duration::from_secs(60),
            batching: true,
            max_batch_items: 32,
            max_batch_tokens: 16_384,
            max_wait: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            model_name: "mlmf".into(),
            handle_signals: false,
            http_threads: 2,
        }
    }
}

fn bad(path: &str, message: impl Into<String>) -> MlmfError {
    MlmfError::Config {
        path: format!("serve.{path}"),
        message: message.into(),
    }
}

impl ServeSettings {
    /// Checks every value; resolves the allowed directories (they must exist).
    pub fn validate(&mut self) -> Result<()> {
        if self.host.trim().is_empty() {
            return Err(bad(
                "host",
                "expected an address to bind, got an empty string",
            ));
        }
        let positive = [
            ("max_body_bytes", self.max_body_bytes),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("max_batch_items", self.max_batch_items),
            ("max_batch_tokens", self.max_batch_tokens),
            ("http_threads", self.http_threads),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(bad(name, "expected a positive value, got 0"));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(bad(
                "request_timeout",
                "expected a positive duration, got 0",
            ));
        }
        if self.max_wait > Duration::from_secs(10) {
            return Err(bad(
                "max_wait",
                format!(
                    "{:?} is longer than 10 s: a batch would hold its first request that long",
                    self.max_wait
                ),
            ));
        }
        if let Some(k) = &self.api_key {
            if k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    "api_key",
                    "expected a non-empty token without spaces or control characters",
                ));
            }
        }
        if self.model_name.is_empty() {
            return Err(bad("model_name", "expected a name, got an empty string"));
        }
        let mut resolved = Vec::with_capacity(self.allow_paths.len());
        for dir in &self.allow_paths {
            let c = dir.canonicalize().map_err(|e| {
                bad(
                    "allow_paths",
                    format!("cannot resolve {}: {e}", dir.display()),
                )
            })?;
            if !c.is_dir() {
                return Err(bad(
                    "allow_paths",
                    format!("{} is not a directory", dir.display()),
                ));
            }
            resolved.push(c);
        }
        self.allow_paths = resolved;
        Ok(())
    }
}

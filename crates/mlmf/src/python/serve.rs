//! `mlmf._mlmf.Server` and `_start_server`: the HTTP server of `crate::serve`, started
//! over a loaded model (`mlmf.serve` in Python wraps them).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::model::PyMultiModalModel;
use super::{detached, guarded};
use crate::error::MlmfError;
use crate::serve::{ServeSettings, Server};

/// A running server. `shutdown()` drains it (new requests get 503, requests in flight
/// finish); `wait()` blocks until it has stopped.
#[pyclass(module = "mlmf._mlmf", name = "Server", frozen)]
pub(crate) struct PyServer {
    inner: Server,
}

fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        PyErr::from(MlmfError::config(
            format!("serve.{name}"),
            format!("expected a non-negative number of seconds, got {s}"),
        ))
    })
}

#[pymethods]
impl PyServer {
    /// The address bound.
    #[getter]
    fn host(&self) -> String {
        self.inner.local_addr().ip().to_string()
    }

    /// The port bound (the one chosen when 0 was asked for).
    #[getter]
    fn port(&self) -> u16 {
        self.inner.local_addr().port()
    }

    /// `http://host:port`.
    #[getter]
    fn url(&self) -> String {
        format!("http://{}", self.inner.local_addr())
    }

    /// Starts draining and returns at once.
    fn shutdown(&self) {
        self.inner.shutdown();
    }

    /// Whether the server has stopped.
    #[getter]
    fn stopped(&self) -> bool {
        self.inner.is_finished()
    }

    /// Blocks (without the GIL) until the server stops, or `timeout` seconds pass;
    /// returns whether it stopped. Raises if serving failed.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let limit = timeout.map(|t| seconds("timeout", t)).transpose()?;
        detached(py, || {
            if let Some(limit) = limit {
                let until = Instant::now() + limit;
                while !self.inner.is_finished() {
                    if Instant::now() >= until {
                        return Ok(false);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.inner.wait().map(|()| true)
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.inner.shutdown();
        detached(py, || self.inner.wait())?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = if self.inner.is_finished() {
            "stopped"
        } else {
            "serving"
        };
        format!("Server(url='{}', {state})", self.url())
    }
}

/// Starts a server over `model`; see `mlmf.serve` for the settings.
#[pyfunction]
#[pyo3(signature = (
    model, *, host, port, api_key, allow_paths, max_body_bytes, max_concurrent_requests,
    request_timeout, batching, max_batch_items, max_batch_tokens, max_wait_ms,
    drain_timeout, model_name, http_threads, handle_signals
))]
#[allow(clippy::too_many_arguments)]
fn _start_server(
    py: Python<'_>,
    model: &PyMultiModalModel,
    host: String,
    port: u16,
    api_key: Option<String>,
    allow_paths: Vec<PathBuf>,
    max_body_bytes: usize,
    max_concurrent_requests: usize,
    request_timeout: f64,
    batching: bool,
    max_batch_items: usize,
    max_batch_tokens: usize,
    max_wait_ms: f64,
    drain_timeout: f64,
    model_name: String,
    http_threads: usize,
    handle_signals: bool,
) -> PyResult<PyServer> {
    let settings = ServeSettings {
        host,
        port,
        api_key,
        allow_paths,
        max_body_bytes,
        max_concurrent_requests,
        request_timeout: seconds("request_timeout", request_timeout)?,
        batching,
        max_batch_items,
        max_batch_tokens,
        max_wait: seconds("max_wait_ms", max_wait_ms / 1000.0)?,
        drain_timeout: seconds("drain_timeout", drain_timeout)?,
        model_name,
        handle_signals,
        http_threads,
    };
    let model = model.inner.clone();
    let inner = guarded(|| py.detach(|| Server::start(model, settings)))?;
    Ok(PyServer { inner })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyServer>()?;
    m.add_function(wrap_pyfunction!(_start_server, m)?)?;
    Ok(())
}

//! `mlmf serve`: an HTTP server over a [`MultiModalModel`] (docs/serving.md).
//!
//! axum on hyper and tokio. Requests are parsed and checked on the HTTP threads; each
//! modality's items go through a batching queue ([`batcher`]) that encodes many
//! requests' items as one batch on a blocking thread; fusion, attention and the aligned
//! heads run on blocking threads too. No request touches Python.
//!
//! Layout: `settings` (what can be set), `routes` (router, admission: API key, draining,
//! the in-flight limit, timeouts, metrics), `api` (the model endpoints), `batcher`,
//! `media` (items from requests), `wire` (JSON in and out), `metrics`, `error`.

mod api;
mod batcher;
mod error;
mod media;
mod metrics;
mod routes;
mod settings;
#[cfg(test)]
mod tests;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

pub use settings::ServeSettings;

use crate::error::{MlmfError, Result};
use crate::model::MultiModalModel;
use routes::AppState;

/// A running server: its address, and the way to stop it.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Arc<Notify>,
    thread: Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn io(what: &str, e: std::io::Error) -> MlmfError {
    MlmfError::Config {
        path: "serve".into(),
        message: format!("{what}: {e}"),
    }
}

impl Server {
    /// Binds `settings.host:port` and serves `model` on a thread of its own; returns
    /// once the socket is bound (so the address is known and requests can be sent).
    pub fn start(model: MultiModalModel, mut settings: ServeSettings) -> Result<Self> {
        settings.validate()?;
        // The server takes raw media only: every modality needs its processor.
        for m in model.modalities() {
            if let Some(why) = model.encoder(m).ok().and_then(|e| e.processor_error()) {
                return Err(MlmfError::config(
                    format!("modalities.{m}.model"),
                    format!("the server takes raw {m} inputs, and this checkpoint cannot process them: {why}"),
                ));
            }
        }
        let listener = std::net::TcpListener::bind((settings.host.as_str(), settings.port))
            .map_err(|e| {
                io(
                    &format!("cannot bind {}:{}", settings.host, settings.port),
                    e,
                )
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("cannot set up the socket", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| io("cannot read the bound address", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.http_threads)
            .thread_name("mlmf-http")
            .enable_all()
            .build()
            .map_err(|e| io("cannot start the runtime", e))?;
        let metrics = Arc::new(
            metrics::Metrics::new().map_err(|e| MlmfError::Internal(format!("metrics: {e}")))?,
        );
        let state = {
            let _rt = rt.enter();
            Arc::new(AppState {
                batchers: batcher::Batchers::start(&model, &settings, metrics.clone()),
                admitted: Arc::new(Semaphore::new(settings.max_concurrent_requests)),
                draining: Default::default(),
                model,
                metrics,
                settings,
            })
        };
        let stop = Arc::new(Notify::new());
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::Builder::new()
                .name("mlmf-serve".into())
                .spawn(move || rt.block_on(serve(listener, state, stop)))
                .map_err(|e| io("cannot start the server thread", e))?
        };
        Ok(Self {
            addr,
            state,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The bound address (the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts draining: new requests get 503, requests in flight finish (up to the
    /// drain timeout), then the server closes. Returns at once; [`Self::wait`] waits.
    pub fn shutdown(&self) {
        self.state.draining.store(true, Ordering::SeqCst);
        self.stop.notify_one();
    }

    /// Whether the server has stopped.
    pub fn is_finished(&self) -> bool {
        self.thread
            .lock()
            .map(|t| t.as_ref().is_none_or(|h| h.is_finished()))
            .unwrap_or(true)
    }

    /// Blocks until the server has stopped (after [`Self::shutdown`], or a signal when
    /// it handles them); the serving error, if it failed.
    pub fn wait(&self) -> Result<()> {
        let handle = self
            .thread
            .lock()
            .map_err(|_| MlmfError::Internal("server handle poisoned".into()))?
            .take();
        match handle {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(MlmfError::Internal("the server thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
        let _ = self.wait();
    }
}

/// Serves until stopped, then drains.
async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    stop: Arc<Notify>,
) -> Result<()> {
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| io("cannot use the socket", e))?;
    let app = routes::router(state.clone());
    let signals = state.settings.handle_signals;
    let drain = async move {
        stopped(&stop, signals).await;
        state.draining.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + state.settings.drain_timeout;
        while state.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Answers are small and written at once: no Nagle delay waiting for the client's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(drain)
        .await
        .map_err(|e| io("serving failed", e))
}

/// Resolves on `shutdown`, or on SIGTERM / SIGINT when the server handles signals.
async fn stopped(stop: &Notify, signals: bool) {
    if !signals {
        return stop.notified().await;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = stop.notified() => {}
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                tokio::select! {
                    _ = stop.notified() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
        }
    }
    #[cfg(not(unix))]
    tokio::select! {
        _ = stop.notified() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

//! The router: model endpoints behind one admission layer (API key, draining, the
//! in-flight limit, the request timeout, metrics), and the open ones (`/health`,
//! `/ready`, `/openapi.json`); JSON errors for unknown paths and methods.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;

use super::api;
use super::batcher::Batchers;
use super::error::ApiError;
use super::metrics::Metrics;
use super::settings::ServeSettings;
use crate::modality::Modality;
use crate::model::MultiModalModel;

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) model: MultiModalModel,
    pub(crate) settings: ServeSettings,
    pub(crate) batchers: Batchers,
    pub(crate) metrics: Arc<Metrics>,
    /// One permit per request admitted.
    pub(crate) admitted: Arc<Semaphore>,
    pub(crate) draining: AtomicBool,
}

impl AppState {
    /// Requests admitted and not yet answered.
    pub(crate) fn in_flight(&self) -> usize {
        self.settings.max_concurrent_requests - self.admitted.available_permits()
    }

    /// The names `/v1/models` lists: the server's model name, then each modality with
    /// a checkpoint by its folder name.
    pub(crate) fn model_names(&self) -> Vec<String> {
        let mut names = vec![self.settings.model_name.clone()];
        for m in self.model.modalities() {
            names.push(m.to_string());
            if let Some(n) = self.checkpoint_name(m) {
                names.push(n);
            }
        }
        names.dedup();
        names
    }

    fn checkpoint_name(&self, m: Modality) -> Option<String> {
        let enc = self.model.encoder(m).ok()?;
        enc.dir()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    }

    /// The modality a `model` name selects (`Some(None)`: the whole model), `None`
    /// for a name not served.
    pub(crate) fn model_for(&self, name: &str) -> Option<Option<Modality>> {
        if name == self.settings.model_name {
            return Some(None);
        }
        self.model
            .modalities()
            .into_iter()
            .find(|m| m.to_string() == name || self.checkpoint_name(*m).as_deref() == Some(name))
            .map(Some)
    }
}

/// Marks an error answer with its type, for the metrics.
#[derive(Clone, Copy)]
pub(crate) struct ErrorKind(pub(crate) &'static str);

type Shared = State<Arc<AppState>>;

/// Every path the router serves (the OpenAPI description lists exactly these).
#[cfg(test)]
pub(crate) const ROUTES: [&str; 9] = [
    "/v1/embeddings",
    "/v1/infer",
    "/v1/similarity",
    "/v1/zero-shot",
    "/v1/models",
    "/metrics",
    "/health",
    "/ready",
    "/openapi.json",
];

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = state.settings.max_body_bytes;
    let models = Router::new()
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/infer", post(api::infer))
        .route("/v1/similarity", post(api::similarity))
        .route("/v1/zero-shot", post(api::zero_shot))
        .route("/v1/models", get(list_models))
        .route_layer(middleware::from_fn_with_state(state.clone(), admit));
    // Scrapes need the key too, but not a slot: they answer under overload and while
    // draining.
    let scrape = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth_only));
    Router::new()
        .merge(models)
        .merge(scrape)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Checks the bearer token in constant time.
fn authorised(s: &AppState, req: &Request) -> bool {
    let Some(key) = &s.settings.api_key else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), key.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ x);
    }
    diff == 0
}

/// Admission and accounting around every model endpoint.
async fn admit(State(s): Shared, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let start = Instant::now();
    let response = if !authorised(&s, &req) {
        ApiError::unauthorized().into_response()
    } else if s.draining.load(Ordering::SeqCst) {
        ApiError::draining().into_response()
    } else {
        match s.admitted.clone().try_acquire_owned() {
            Err(_) => ApiError::overloaded(s.settings.max_concurrent_requests).into_response(),
            Ok(permit) => {
                s.metrics.in_flight.inc();
                let r = tokio::time::timeout(s.settings.request_timeout, next.run(req)).await;
                s.metrics.in_flight.dec();
                drop(permit);
                r.unwrap_or_else(|_| ApiError::timeout(s.settings.request_timeout).into_response())
            }
        }
    };
    let status = response.status();
    let m = &s.metrics;
    m.requests
        .with_label_values(&[&endpoint, status.as_str()])
        .inc();
    m.latency
        .with_label_values(&[&endpoint])
        .observe(start.elapsed().as_secs_f64());
    if let Some(ErrorKind(kind)) = response.extensions().get::<ErrorKind>() {
        m.errors.with_label_values(&[endpoint.as_str(), kind]).inc();
    }
    response
}

async fn auth_only(State(s): Shared, req: Request, next: Next) -> Response {
    if authorised(&s, &req) {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// 200 once the model is loaded (it is before the server binds) and until draining
/// starts; 503 while draining.
async fn ready(State(s): Shared) -> Response {
    if s.draining.load(Ordering::SeqCst) {
        return ApiError::draining().into_response();
    }
    let modalities: Vec<String> = s
        .model
        .enabled_modalities()
        .iter()
        .map(ToString::to_string)
        .collect();
    axum::Json(serde_json::json!({"status": "ready", "modalities": modalities})).into_response()
}

async fn list_models(State(s): Shared) -> Response {
    let data: Vec<serde_json::Value> = s
        .model_names()
        .into_iter()
        .map(
            |id| serde_json::json!({"id": id, "object": "model", "owned_by": "mlmf", "created": 0}),
        )
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(s): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.model),
    )
        .into_response()
}

/// The OpenAPI 3.1 description of every route.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!(
        "no route {} {}: see /openapi.json",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}

//! Dynamic batching: one queue per modality. Items of requests that arrive together
//! are encoded as one batch (up to `max_batch_items` items, or `max_batch_tokens`
//! tokens for text, waiting at most `max_wait` after the first), then handed back to
//! their requests. Work whose request went away (a disconnect, a timeout) is dropped
//! before it runs; an item that fails fails only its own request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::error::ApiError;
use super::metrics::Metrics;
use super::settings::ServeSettings;
use crate::encoders::RawInputs;
use crate::error::catch_panic;
use crate::modality::Modality;
use crate::model::keys;
use crate::model::{MultiModalModel, PreEncoded};

type Reply = Result<PreEncoded, ApiError>;

/// One request's items of one modality, waiting for a batch.
struct Job {
    items: RawInputs,
    n: usize,
    /// Tokens for text, items otherwise.
    cost: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The per-modality queues in front of a model.
pub(crate) struct Batchers {
    model: MultiModalModel,
    metrics: Arc<Metrics>,
    queues: BTreeMap<Modality, mpsc::UnboundedSender<Job>>,
}

impl Batchers {
    /// Starts one batching task per modality of the model (none with batching off).
    /// Must run inside the server's runtime.
    pub(crate) fn start(model: &MultiModalModel, s: &ServeSettings, metrics: Arc<Metrics>) -> Self {
        let mut queues = BTreeMap::new();
        if s.batching {
            for m in model.modalities() {
                let (tx, rx) = mpsc::unbounded_channel();
                let limits = Limits {
                    items: s.max_batch_items,
                    cost: if m == Modality::Text {
                        s.max_batch_tokens
                    } else {
                        s.max_batch_items
                    },
                    wait: s.max_wait,
                };
                tokio::spawn(run(m, model.clone(), rx, limits, metrics.clone()));
                queues.insert(m, tx);
            }
        }
        Self {
            model: model.clone(),
            metrics,
            queues,
        }
    }

    /// Encodes `items` (one modality) through the modality's queue, or on its own with
    /// batching off. `cost`: the items' tokens for text, their count otherwise (the
    /// queue's budget unit). The request's queue wait and the batch's encode time are
    /// recorded.
    pub(crate) async fn encode(&self, items: RawInputs, cost: usize) -> Reply {
        let m = keys::modality(&items);
        let Some(tx) = self.queues.get(&m) else {
            let model = self.model.clone();
            let metrics = self.metrics.clone();
            return tokio::task::spawn_blocking(move || {
                let n = keys::len(&items);
                encode_batch(&model, m, items, n, &metrics)
            })
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("{m} encoding task failed: {e}"))));
        };
        let (reply, rx) = oneshot::channel();
        let job = Job {
            n: keys::len(&items),
            items,
            cost,
            enqueued: Instant::now(),
            reply,
        };
        let depth = self
            .metrics
            .queue_depth
            .with_label_values(&[&m.to_string()]);
        depth.inc();
        if tx.send(job).is_err() {
            depth.dec();
            return Err(ApiError::internal(format!("the {m} queue has stopped")));
        }
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal(format!("the {m} batch was lost"))))
    }
}

#[derive(Clone, Copy)]
struct Limits {
    items: usize,
    cost: usize,
    wait: std::time::Duration,
}

/// One modality's batching loop: the next batch forms while the last one runs, so
/// under load batches fill without waiting.
async fn run(
    m: Modality,
    model: MultiModalModel,
    mut rx: mpsc::UnboundedReceiver<Job>,
    limits: Limits,
    metrics: Arc<Metrics>,
) {
    let depth = metrics.queue_depth.with_label_values(&[&m.to_string()]);
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => {
                    depth.dec();
                    j
                }
                None => return,
            },
        };
        let (mut items, mut cost) = (first.n, first.cost);
        let mut jobs = vec![first];
        let until = tokio::time::Instant::now() + limits.wait;
        while items < limits.items && cost < limits.cost {
            // What is queued now; then, with a wait, what arrives before the deadline.
            // (A zero wait never touches the timer, whose 1 ms ticks would delay a lone
            // request by up to a millisecond.)
            let next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(_) if limits.wait.is_zero() => None,
                Err(_) => tokio::time::timeout_at(until, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(j) = next else { break };
            depth.dec();
            if items + j.n > limits.items || cost + j.cost > limits.cost {
                carry = Some(j);
                break;
            }
            items += j.n;
            cost += j.cost;
            jobs.push(j);
        }
        let before = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        if before > jobs.len() {
            metrics
                .dropped
                .with_label_values(&[&m.to_string(), "disconnected"])
                .inc_by((before - jobs.len()) as u64);
        }
        if jobs.is_empty() {
            continue;
        }
        let now = Instant::now();
        for j in &jobs {
            metrics.stage("queue", &m.to_string(), now - j.enqueued);
        }
        let model = model.clone();
        let metrics = metrics.clone();
        // The loop waits for its batch: one batch per modality runs at a time, and the
        // encoder's own threads use the cores.
        let _ = tokio::task::spawn_blocking(move || run_jobs(&model, m, jobs, &metrics)).await;
    }
}

/// Encodes one batch (no queue), recording its size and time.
fn encode_batch(
    model: &MultiModalModel,
    m: Modality,
    items: RawInputs,
    n: usize,
    metrics: &Metrics,
) -> Reply {
    let t = Instant::now();
    let r = catch_panic("encoding panicked", || model.encode_keyed(m, items));
    metrics
        .batch_items
        .with_label_values(&[&m.to_string()])
        .observe(n as f64);
    metrics.stage("encode", &m.to_string(), t.elapsed());
    r.map_err(ApiError::from)
}

/// Runs a batch of jobs and answers each. If the batch fails and has several jobs,
/// each job runs again on its own, so one bad item fails only its request.
fn run_jobs(model: &MultiModalModel, m: Modality, mut jobs: Vec<Job>, metrics: &Metrics) {
    if jobs.len() == 1 {
        if let Some(j) = jobs.pop() {
            let _ = j.reply.send(encode_batch(model, m, j.items, j.n, metrics));
        }
        return;
    }
    let total: usize = jobs.iter().map(|j| j.n).sum();
    let all = concat(jobs.iter().map(|j| j.items.clone()));
    match encode_batch(model, m, all, total, metrics) {
        Ok(pre) => {
            let PreEncoded { keys, items, stats } = pre;
            let (mut keys, mut items) = (keys.into_iter(), items.into_iter());
            for j in jobs {
                let part = PreEncoded {
                    keys: keys.by_ref().take(j.n).collect(),
                    items: items.by_ref().take(j.n).collect(),
                    stats: stats.clone(),
                };
                let _ = j.reply.send(Ok(part));
            }
        }
        Err(_) => {
            for j in jobs {
                if j.reply.is_closed() {
                    continue;
                }
                let _ = j.reply.send(encode_batch(model, m, j.items, j.n, metrics));
            }
        }
    }
}

/// The items of several requests (one modality) as one batch, in order.
fn concat(parts: impl Iterator<Item = RawInputs>) -> RawInputs {
    let mut out: Option<RawInputs> = None;
    for p in parts {
        match (&mut out, p) {
            (None, p) => out = Some(p),
            (Some(RawInputs::Text(a)), RawInputs::Text(b)) => a.extend(b),
            (Some(RawInputs::Image(a)), RawInputs::Image(b)) => a.extend(b),
            (Some(RawInputs::Audio(a)), RawInputs::Audio(b)) => a.extend(b),
            (Some(RawInputs::Video(a)), RawInputs::Video(b)) => a.extend(b),
            // Jobs reach a queue only through `encode`, which routes by modality.
            _ => {}
        }
    }
    out.unwrap_or(RawInputs::Text(Vec::new()))
}

//! `/metrics` in Prometheus' text format, through the `prometheus` crate (its
//! registry, counters, histograms and encoder), one registry per server.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::model::MultiModalModel;

/// Latency buckets, seconds: 0.5 ms to 60 s.
const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) errors: IntCounterVec,
    pub(crate) latency: HistogramVec,
    pub(crate) stages: HistogramVec,
    pub(crate) batch_items: HistogramVec,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) in_flight: IntGauge,
    pub(crate) dropped: IntCounterVec,
    cache_hits: IntGaugeVec,
    cache_misses: IntGaugeVec,
    cache_bytes: IntGaugeVec,
    cache_entries: IntGaugeVec,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub(crate) fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let in_flight = IntGauge::new(
            "mlmf_requests_in_flight",
            "Requests admitted and not yet answered (queued or running)",
        )?;
        r.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            requests: counter(&r, "mlmf_requests_total", "Requests answered, by endpoint and status", &["endpoint", "status"])?,
            errors: counter(&r, "mlmf_request_errors_total", "Error answers, by endpoint and error type", &["endpoint", "type"])?,
            latency: histogram(&r, "mlmf_request_duration_seconds", "Time from request to answer, by endpoint", &["endpoint"], LATENCY)?,
            stages: histogram(
                &r,
                "mlmf_stage_duration_seconds",
                "Time per stage: queue (waiting for a batch), encode (preprocess and encode of a batch), fuse, similarity",
                &["stage", "modality"],
                LATENCY,
            )?,
            batch_items: histogram(&r, "mlmf_batch_items", "Items per encoder batch, by modality", &["modality"], BATCH)?,
            queue_depth: gauge(&r, "mlmf_queue_depth", "Requests waiting for an encoder batch, by modality", &["modality"])?,
            in_flight,
            dropped: counter(
                &r,
                "mlmf_dropped_requests_total",
                "Queued work dropped before it ran, by modality and reason (disconnected: the client went away or timed out)",
                &["modality", "reason"],
            )?,
            cache_hits: gauge(&r, "mlmf_cache_hits", "Encoding cache hits since start (or the last stats reset), by modality", &["modality"])?,
            cache_misses: gauge(&r, "mlmf_cache_misses", "Encoding cache misses since start (or the last stats reset), by modality", &["modality"])?,
            cache_bytes: gauge(&r, "mlmf_cache_bytes", "Bytes held by the encoding cache, by modality", &["modality"])?,
            cache_entries: gauge(&r, "mlmf_cache_entries", "Entries held by the encoding cache, by modality", &["modality"])?,
            registry: r,
        })
    }

    pub(crate) fn stage(&self, stage: &str, modality: &str, took: Duration) {
        self.stages
            .with_label_values(&[stage, modality])
            .observe(took.as_secs_f64());
    }

    /// The text exposition, with the caches' figures read now.
    pub(crate) fn render(&self, model: &MultiModalModel) -> String {
        let stats = model.stats();
        for (m, s) in &stats.modalities {
            if let Some(c) = &s.cache {
                let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
                self.cache_hits.with_label_values(&[m]).set(v(c.hits));
                self.cache_misses.with_label_values(&[m]).set(v(c.misses));
                self.cache_bytes.with_label_values(&[m]).set(v(c.bytes));
                self.cache_entries.with_label_values(&[m]).set(v(c.entries));
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a metric family that does not encode
        // is left out rather than failing the scrape.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

//! Training of the fusion, attention-pair, adapter and objective-head weights on
//! frozen encoders' outputs (docs/training.md).
//!
//! - [`data`]: rows encoded once (through the model's caches) into a [`Dataset`];
//! - [`Trainer`]: the loop (AdamW, warmup + cosine, clipping, modality dropout,
//!   curriculum stages, validation, early stopping, checkpoints, resume);
//! - the differentiable twins of the inference layers (`fusion`, `attention`, `nn`),
//!   the objectives, the optimiser and the metrics.
//!
//! The inference layers keep their fast paths; training runs the candle op path,
//! whose forward is tested equal to inference's.

mod attention;
mod checkpoint;
pub mod data;
mod evaluate;
mod fusion;
mod metrics;
mod nets;
mod nn;
mod objectives;
mod ops;
mod ops_attention;
mod ops_layer;
mod ops_loss;
mod optim;
mod par;
mod rng;
mod trainer;
mod vars;

#[cfg(test)]
mod tests;

pub use data::{Dataset, DatasetBuilder, Example, Layout, RowData};
pub use trainer::{EpochRecord, Event, StepInfo, Trainer, CONFIG_FILE, HEADS_FILE};

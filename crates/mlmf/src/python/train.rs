//! `mlmf._mlmf._Trainer`, `_DatasetBuilder` and `_Dataset`: the training core behind
//! `mlmf.Trainer` (python/mlmf/train/), which reads the data files and draws progress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::config::{from_py, modality_arg, to_py};
use super::model::PyMultiModalModel;
use crate::config::TrainConfig;
use crate::error::MlmfError;
use crate::modality::Modality;
use crate::train::{Dataset, DatasetBuilder, Event, Example, RowData, Trainer};

/// Encoded training data.
#[pyclass(module = "mlmf._mlmf", name = "_Dataset", frozen)]
pub(crate) struct PyDataset {
    inner: Arc<Dataset>,
}

#[pymethods]
impl PyDataset {
    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// What names the data in errors.
    #[getter]
    fn origin(&self) -> String {
        self.inner.origin().to_string()
    }

    /// Rows carrying `modality`.
    fn count(&self, modality: &Bound<'_, PyAny>) -> PyResult<usize> {
        Ok(self.inner.count(modality_arg(modality)?))
    }

    /// `(bytes of token states on disk, bytes of pooled vectors in memory)`.
    fn bytes(&self) -> (u64, u64) {
        self.inner.bytes()
    }

    fn __repr__(&self) -> String {
        format!(
            "_Dataset({:?}, rows={})",
            self.inner.origin(),
            self.inner.len()
        )
    }
}

fn examples(obj: &Bound<'_, PyList>) -> PyResult<Vec<Example>> {
    obj.iter()
        .map(|e| {
            let (id, label, target): (Option<String>, Option<i64>, Option<Vec<f32>>) =
                e.extract()?;
            Ok(Example { id, label, target })
        })
        .collect()
}

/// Points an item error at its row (`positions[i] + start`) instead of its place in
/// the modality's sub-batch.
fn at_row(mut e: MlmfError, positions: &[usize], start: usize) -> MlmfError {
    if let MlmfError::Input { index, .. }
    | MlmfError::Decode { index, .. }
    | MlmfError::Io { index, .. } = &mut e
    {
        if let Some(i) = index.as_mut() {
            if let Some(&p) = positions.get(*i) {
                *i = p + start;
            }
        }
    }
    e
}

/// Collects rows into a `_Dataset`.
#[pyclass(module = "mlmf._mlmf", name = "_DatasetBuilder")]
pub(crate) struct PyDatasetBuilder {
    inner: Option<DatasetBuilder>,
}

impl PyDatasetBuilder {
    fn builder(&mut self) -> PyResult<&mut DatasetBuilder> {
        self.inner
            .as_mut()
            .ok_or_else(|| MlmfError::Internal("the dataset is already finished".into()).into())
    }
}

#[pymethods]
impl PyDatasetBuilder {
    fn __len__(&self) -> usize {
        self.inner.as_ref().map_or(0, DatasetBuilder::len)
    }

    /// Encodes `rows` (dicts of modality name -> raw item) through `model`'s caches and
    /// appends them with their `examples` (`(id, label, target)` per row). `start` is
    /// the index of the first row in the data, for error messages.
    #[pyo3(signature = (model, rows, examples, start=0, sampling_rate=None, fps=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_rows(
        &mut self,
        py: Python<'_>,
        model: &PyMultiModalModel,
        rows: &Bound<'_, PyList>,
        examples: &Bound<'_, PyList>,
        start: usize,
        sampling_rate: Option<u32>,
        fps: Option<f64>,
    ) -> PyResult<()> {
        let ex = self::examples(examples)?;
        let n = rows.len();
        if ex.len() != n {
            return Err(MlmfError::Internal("one example per row".into()).into());
        }
        let mut per: BTreeMap<Modality, (Vec<usize>, Bound<'_, PyList>)> = BTreeMap::new();
        for (r, row) in rows.iter().enumerate() {
            let row = row
                .cast::<PyDict>()
                .map_err(|_| PyErr::from(MlmfError::Internal("a row must be a dict".into())))?;
            for (k, v) in row.iter() {
                let m = modality_arg(&k)?;
                let e = per
                    .entry(m)
                    .or_insert_with(|| (Vec::new(), PyList::empty(py)));
                e.0.push(r);
                e.1.append(v)?;
            }
        }
        let mut data: Vec<BTreeMap<Modality, RowData>> = vec![BTreeMap::new(); n];
        for (m, (positions, items)) in per {
            if model.inner.widths(m).is_err() {
                return Err(MlmfError::data(
                    "rows",
                    Some(start + positions[0]),
                    Some(&m.to_string()),
                    format!(
                        "the model has no `{m}` modality (it has {})",
                        model
                            .inner
                            .modalities()
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .into());
            }
            let raw = model.raw_inputs(m, items.as_any(), sampling_rate, fps)?;
            let inner = model.inner.clone();
            let encoded = py
                .detach(|| super::guarded(move || inner.encode_items(m, raw)))
                .map_err(|e| PyErr::from(at_row(e, &positions, start)))?;
            for (p, enc) in positions.iter().zip(encoded) {
                data[*p].insert(m, RowData::from_item(&enc)?);
            }
        }
        let b = self.builder()?;
        for (e, d) in ex.into_iter().zip(data) {
            b.push(e, d)?;
        }
        Ok(())
    }

    /// Appends rows given as arrays: `arrays` `{modality: float32 [N, D] or [N, T, D]}`,
    /// `masks` `{modality: [N, T]}` (0/1), `present` `{modality: bool [N]}` (rows
    /// without the modality), and `examples` per row.
    fn add_arrays(
        &mut self,
        arrays: &Bound<'_, PyDict>,
        masks: &Bound<'_, PyDict>,
        present: &Bound<'_, PyDict>,
        examples: &Bound<'_, PyList>,
    ) -> PyResult<()> {
        let ex = self::examples(examples)?;
        let n = ex.len();
        let mut data: Vec<BTreeMap<Modality, RowData>> = vec![BTreeMap::new(); n];
        for (k, v) in arrays.iter() {
            let m = modality_arg(&k)?;
            let a: PyReadonlyArrayDyn<'_, f32> = v.extract().map_err(|_| {
                PyErr::from(MlmfError::data(
                    "arrays",
                    None,
                    Some(&m.to_string()),
                    "expected a float32 array",
                ))
            })?;
            let shape = a.shape().to_vec();
            if shape.first() != Some(&n) || !(2..=3).contains(&shape.len()) {
                return Err(MlmfError::data(
                    "arrays",
                    None,
                    Some(&m.to_string()),
                    format!(
                        "expected [{n}, D] or [{n}, T, D] (one row per example), got {shape:?}"
                    ),
                )
                .into());
            }
            let values: Vec<f32> = a.as_array().iter().copied().collect();
            let mask: Option<Vec<f32>> = match masks.get_item(k.clone())? {
                Some(mk) => {
                    let mk: PyReadonlyArrayDyn<'_, f32> = mk.extract()?;
                    if shape.len() != 3 || mk.shape() != [shape[0], shape[1]] {
                        return Err(MlmfError::data(
                            "arrays",
                            None,
                            Some(&format!("{m}_mask")),
                            format!(
                                "expected [{}, {}] matching the token states",
                                shape[0],
                                shape.get(1).copied().unwrap_or(1)
                            ),
                        )
                        .into());
                    }
                    Some(mk.as_array().iter().copied().collect())
                }
                None => None,
            };
            let has: Option<Vec<bool>> = match present.get_item(k)? {
                Some(p) => Some(p.extract()?),
                None => None,
            };
            let row = values.len() / n.max(1);
            for (r, d) in data.iter_mut().enumerate() {
                if has.as_ref().is_some_and(|h| !h[r]) {
                    continue;
                }
                let x = values[r * row..(r + 1) * row].to_vec();
                let rd = if shape.len() == 2 {
                    RowData {
                        pooled: x,
                        tokens: None,
                    }
                } else {
                    let (t, w) = (shape[1], shape[2]);
                    let mk: Vec<u8> = match &mask {
                        Some(mk) => mk[r * t..(r + 1) * t]
                            .iter()
                            .map(|&v| u8::from(v != 0.0))
                            .collect(),
                        None => vec![1; t],
                    };
                    // The real tokens up to the last one, as the model stores items.
                    let len = mk.iter().rposition(|&v| v != 0).map_or(1, |p| p + 1);
                    let count = mk.iter().filter(|&&v| v != 0).count().max(1) as f32;
                    let mut pooled = vec![0f32; w];
                    for (i, &keep) in mk.iter().enumerate().take(len) {
                        if keep != 0 {
                            for (p, v) in pooled.iter_mut().zip(&x[i * w..(i + 1) * w]) {
                                *p += v / count;
                            }
                        }
                    }
                    RowData {
                        pooled,
                        tokens: Some((x[..len * w].to_vec(), mk[..len].to_vec())),
                    }
                };
                d.insert(m, rd);
            }
        }
        let b = self.builder()?;
        for (e, d) in ex.into_iter().zip(data) {
            b.push(e, d)?;
        }
        Ok(())
    }

    /// The dataset (the builder cannot be used afterwards).
    fn finish(&mut self) -> PyResult<PyDataset> {
        let b = self.inner.take().ok_or_else(|| {
            PyErr::from(MlmfError::Internal(
                "the dataset is already finished".into(),
            ))
        })?;
        Ok(PyDataset {
            inner: Arc::new(b.finish()?),
        })
    }
}

/// The training loop over a loaded model (see `mlmf.Trainer`).
#[pyclass(module = "mlmf._mlmf", name = "_Trainer", frozen)]
pub(crate) struct PyTrainer {
    inner: Mutex<Trainer>,
}

impl PyTrainer {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Trainer>> {
        self.inner
            .lock()
            .map_err(|_| MlmfError::Internal("a previous training call panicked".into()).into())
    }
}

fn record_dict<'py>(
    py: Python<'py>,
    kind: &str,
    v: serde_json::Value,
) -> PyResult<Bound<'py, PyAny>> {
    let mut v = v;
    if let Some(o) = v.as_object_mut() {
        o.insert("event".into(), kind.into());
    }
    to_py(py, &v)
}

#[pymethods]
impl PyTrainer {
    /// A trainer for `model` with the `[train]` settings `config` (a dict).
    #[new]
    fn new(model: &PyMultiModalModel, config: &Bound<'_, PyAny>) -> PyResult<Self> {
        let cfg: TrainConfig = serde_path_to_error::deserialize(from_py(config)?).map_err(|e| {
            let path = e.path().to_string();
            MlmfError::config(
                if path == "." {
                    "train".to_string()
                } else {
                    format!("train.{path}")
                },
                e.inner().to_string(),
            )
        })?;
        Ok(Self {
            inner: Mutex::new(Trainer::new(model.inner.clone(), cfg)?),
        })
    }

    /// What datasets keep: `[{modality, pooled_width, token_width, tokens}]`.
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for l in self.lock()?.layout() {
            let d = PyDict::new(py);
            d.set_item("modality", l.modality.to_string())?;
            d.set_item("pooled_width", l.pooled_width)?;
            d.set_item("token_width", l.token_width)?;
            d.set_item("tokens", l.tokens)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// A builder of a dataset for this trainer (token states under `dir`, or a
    /// temporary folder removed with the dataset).
    #[pyo3(signature = (origin, dir=None))]
    fn builder(&self, origin: &str, dir: Option<PathBuf>) -> PyResult<PyDatasetBuilder> {
        Ok(PyDatasetBuilder {
            inner: Some(self.lock()?.dataset_builder(origin, dir.as_deref())?),
        })
    }

    /// Trains; `callback(event: dict)` sees every step and epoch. Returns the history.
    #[pyo3(signature = (train, out, val=None, resume=false, callback=None))]
    fn fit<'py>(
        &self,
        py: Python<'py>,
        train: &PyDataset,
        out: PathBuf,
        val: Option<&PyDataset>,
        resume: bool,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let train = train.inner.clone();
        let val = val.map(|v| v.inner.clone());
        let raised: Mutex<Option<PyErr>> = Mutex::new(None);
        let mut guard = self.lock()?;
        let trainer: &mut Trainer = &mut guard;
        let result = py.detach(|| {
            crate::error::catch_panic("training panicked", || {
                trainer.fit(&train, val.as_deref(), &out, resume, &mut |e| {
                    Python::attach(|py| {
                        let call = || -> PyResult<()> {
                            if let Some(cb) = &callback {
                                let d = match e {
                                    Event::Step(s) => record_dict(
                                        py,
                                        "step",
                                        serde_json::json!({
                                            "epoch": s.epoch, "epochs": s.epochs, "step": s.step,
                                            "total_steps": s.total_steps, "loss": s.loss, "lr": s.lr,
                                            "items_per_second": s.items_per_second, "stage": s.stage,
                                        }),
                                    )?,
                                    Event::Epoch(r) => record_dict(
                                        py,
                                        "epoch",
                                        serde_json::to_value(r).map_err(|e| MlmfError::Internal(e.to_string()))?,
                                    )?,
                                };
                                cb.call1(py, (d,))?;
                            }
                            py.check_signals()
                        };
                        call().map_err(|err| {
                            if let Ok(mut slot) = raised.lock() {
                                *slot = Some(err);
                            }
                            MlmfError::Train("stopped by the caller".into())
                        })
                    })
                })
            })
        });
        if let Some(err) = raised.lock().ok().and_then(|mut s| s.take()) {
            return Err(err);
        }
        let history = result?;
        to_py(
            py,
            &serde_json::to_value(history).map_err(|e| MlmfError::Internal(e.to_string()))?,
        )
    }

    /// Every metric on `data` (a dict of floats).
    fn evaluate<'py>(&self, py: Python<'py>, data: &PyDataset) -> PyResult<Bound<'py, PyAny>> {
        let data = data.inner.clone();
        let guard = self.lock()?;
        let trainer: &Trainer = &guard;
        let metrics = py.detach(|| {
            crate::error::catch_panic("evaluation panicked", || trainer.evaluate(&data))
        })?;
        to_py(
            py,
            &serde_json::to_value(metrics).map_err(|e| MlmfError::Internal(e.to_string()))?,
        )
    }

    /// Loads objective heads saved with a trained model (`heads.safetensors`).
    fn load_heads(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.lock()?.load_heads(&path)?)
    }

    /// Writes the current weights and their config to `out`.
    fn write_model(&self, out: PathBuf) -> PyResult<()> {
        std::fs::create_dir_all(&out)
            .map_err(|e| MlmfError::Train(format!("cannot create {}: {e}", out.display())))?;
        Ok(self.lock()?.write_model(&out)?)
    }

    /// Attention pairs that no objective trains.
    #[getter]
    fn untrained_pairs(&self) -> PyResult<Vec<String>> {
        Ok(self.lock()?.untrained_pairs())
    }

    /// `[(name, shape, trained)]` of every tensor.
    #[getter]
    fn tensors(&self) -> PyResult<Vec<(String, Vec<usize>, bool)>> {
        Ok(self.lock()?.tensors())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDataset>()?;
    m.add_class::<PyDatasetBuilder>()?;
    m.add_class::<PyTrainer>()?;
    Ok(())
}

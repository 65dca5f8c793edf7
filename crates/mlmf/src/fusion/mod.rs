//! Fusion: the embeddings of several modalities become one (docs/fusion.md).
//!
//! [`Fusion`] holds one strategy ([`FusionStrategy`]) over a fixed, ordered set of
//! modalities and their widths. A call passes any subset of them, each as pooled
//! embeddings `[B, D]` or token states `[B, T, D]` with an optional `[B, T]` 0/1 mask; a
//! missing modality is masked out so that the result equals fusing only the present
//! ones. Built-in strategies and user components share the [`FusionComponent`] trait.
//!
//! Weights load from and save to safetensors under the names docs/fusion.md lists;
//! without a file a fusion initialises deterministically from a seed and reports
//! itself untrained.

mod attention;
pub mod blocks;
mod early;
mod gated;
mod late;
mod middle;
pub(crate) mod params;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::attention::{check_finite, check_mask};
use crate::config::FusionStrategy;
use crate::encoders::cpu::{self, StackBias};
use crate::encoders::layers::{ce, Linear, MASKED};
use crate::error::{MlmfError, Result};
use crate::modality::Modality;

use params::Params;

/// One modality's input to a fusion call.
#[derive(Debug, Clone)]
pub struct ModalityInput {
    /// `[B, D]` pooled embeddings or `[B, T, D]` token states.
    pub states: Tensor,
    /// `[B, T]` of 0/1 (1 = real token), token states only.
    pub mask: Option<Tensor>,
}

impl ModalityInput {
    /// Pooled embeddings `[B, D]`.
    pub fn pooled(states: Tensor) -> Self {
        Self { states, mask: None }
    }

    /// Token states `[B, T, D]` with an optional `[B, T]` mask.
    pub fn tokens(states: Tensor, mask: Option<Tensor>) -> Self {
        Self { states, mask }
    }
}

/// A checked input: float32 tokens `[B, T, D]` (pooled inputs are one token).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[B, T, D]` float32.
    pub tokens: Tensor,
    /// `[B, T]` float32 0/1, when given.
    pub mask: Option<Tensor>,
    /// Whether the caller passed pooled `[B, D]` embeddings.
    pub pooled_form: bool,
}

impl Prepared {
    /// `[B, D]`: the input itself when pooled, else the masked mean of its tokens.
    pub fn pooled(&self) -> Result<Tensor> {
        if self.pooled_form {
            return self.tokens.squeeze(1).map_err(ce("fusion pool"));
        }
        masked_mean(&self.tokens, self.mask.as_ref())
    }
}

/// The checked inputs of one call, in the fusion's modality order.
#[derive(Debug, Clone)]
pub struct FusionInputs {
    /// Every modality of the fusion with its width.
    pub modalities: Vec<(Modality, usize)>,
    /// `Some` for the modalities present in this call.
    pub values: Vec<Option<Prepared>>,
    /// Rows in the batch.
    pub batch: usize,
    /// Where the inputs live.
    pub device: Device,
}

impl FusionInputs {
    /// `(index, modality, input)` of the present modalities, in order.
    pub fn present(&self) -> impl Iterator<Item = (usize, Modality, &Prepared)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, self.modalities[i].0, v)))
    }

    /// Pooled `[B, D_m]` of every present modality (`None` for missing ones).
    pub fn pooled(&self) -> Result<Vec<Option<Tensor>>> {
        self.values
            .iter()
            .map(|v| v.as_ref().map(Prepared::pooled).transpose())
            .collect()
    }

    /// `[M]`: 1 for present modalities, 0 for missing ones.
    fn presence(&self) -> Result<Tensor> {
        let v: Vec<f32> = self
            .values
            .iter()
            .map(|v| if v.is_some() { 1.0 } else { 0.0 })
            .collect();
        let n = v.len();
        Tensor::from_vec(v, n, &self.device).map_err(ce("fusion presence"))
    }
}

/// What a fusion call returns.
#[derive(Debug, Clone)]
pub struct FusionOutput {
    /// `[B, out_dim]`.
    pub fused: Tensor,
    /// `[B, M]` per-modality weights (attention and late-weighted softmax, gate values),
    /// 0 for missing modalities; `None` for strategies without any.
    pub gates: Option<Tensor>,
    /// Named attention weights `[B, H, Tq, Tk]` (`layers.{i}` for `early`,
    /// `layers.{i}.{modality}` for `middle`), when asked for.
    pub attention: Vec<(String, Tensor)>,
}

/// A fusion strategy: built-in ones and user components alike.
pub trait FusionComponent: Send + Sync {
    /// Fuses checked inputs into `[B, out_dim]`.
    fn fuse(&self, inputs: &FusionInputs, return_attention: bool) -> Result<FusionOutput>;
}

fn registry() -> &'static Mutex<HashMap<String, Arc<dyn FusionComponent>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<dyn FusionComponent>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Makes `component` available to `FusionStrategy::Custom { name }` (and to config
/// files naming it); a second registration under a name replaces the first.
pub fn register_component(name: &str, component: Arc<dyn FusionComponent>) {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), component);
}

/// Names registered with [`register_component`], sorted.
pub fn registered_components() -> Vec<String> {
    let mut v: Vec<String> = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

/// Where a fusion's weights come from, and which modalities a call must carry.
#[derive(Debug, Clone, Default)]
pub struct FusionSettings {
    /// A safetensors file; `None` = seeded, untrained initialisation.
    pub weights: Option<PathBuf>,
    /// Seed of the untrained initialisation.
    pub seed: u64,
    /// Modalities every call must include.
    pub required: Vec<Modality>,
}

/// A fusion layer; see the module docs.
#[derive(Clone)]
pub struct Fusion {
    strategy: FusionStrategy,
    modalities: Vec<(Modality, usize)>,
    out_dim: usize,
    required: Vec<Modality>,
    component: Arc<dyn FusionComponent>,
    tensors: Vec<(String, Tensor)>,
    untrained: bool,
}

impl std::fmt::Debug for Fusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fusion")
            .field("strategy", &self.strategy)
            .field("modalities", &self.modalities)
            .field("out_dim", &self.out_dim)
            .field("required", &self.required)
            .field("tensors", &self.tensors.len())
            .field("untrained", &self.untrained)
            .finish()
    }
}

fn check_layout(dims: &[(Modality, usize)], out_dim: usize, required: &[Modality]) -> Result<()> {
    if dims.is_empty() {
        return Err(MlmfError::config(
            "dims",
            "a fusion needs at least one modality",
        ));
    }
    for (i, (m, d)) in dims.iter().enumerate() {
        if *d == 0 {
            return Err(MlmfError::config(
                format!("dims.{m}"),
                "width must be at least 1",
            ));
        }
        if dims[..i].iter().any(|(n, _)| n == m) {
            return Err(MlmfError::config(
                format!("dims.{m}"),
                "the modality is listed twice",
            ));
        }
    }
    if out_dim == 0 {
        return Err(MlmfError::config("out_dim", "must be at least 1"));
    }
    if let Some(r) = required.iter().find(|r| !dims.iter().any(|(m, _)| m == *r)) {
        return Err(MlmfError::config(
            "required",
            format!(
                "`{r}` is not one of the fusion's modalities ({})",
                names(dims)
            ),
        ));
    }
    Ok(())
}

fn names(dims: &[(Modality, usize)]) -> String {
    dims.iter()
        .map(|(m, _)| m.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Fusion {
    /// A built-in strategy (or a registered custom component) over `dims`, fusing to
    /// `out_dim`.
    pub fn new(
        strategy: &FusionStrategy,
        dims: &[(Modality, usize)],
        out_dim: usize,
        settings: &FusionSettings,
        device: &Device,
    ) -> Result<Self> {
        strategy.validate()?;
        check_layout(dims, out_dim, &settings.required)?;
        let mut p = match &settings.weights {
            Some(path) => Params::load(path, device)?,
            None => Params::seeded(settings.seed, device),
        };
        let p_seeded = p.is_seeded();
        let component: Arc<dyn FusionComponent> = match strategy {
            FusionStrategy::Early(o) => Arc::new(early::Early::new(&mut p, dims, out_dim, o)?),
            FusionStrategy::Middle(o) => Arc::new(middle::Middle::new(&mut p, dims, out_dim, o)?),
            FusionStrategy::Late(o) => Arc::new(late::Late::new(&mut p, dims, out_dim, o.mode)?),
            FusionStrategy::Attention(o) => Arc::new(attention::AttentionFusion::new(
                &mut p,
                dims,
                out_dim,
                o.attention_dim,
            )?),
            FusionStrategy::Gated(_) => Arc::new(gated::Gated::new(&mut p, dims, out_dim)?),
            FusionStrategy::Custom(crate::config::fusion::CustomOptions { name }) => {
                if settings.weights.is_some() {
                    return Err(MlmfError::config(
                        "weights",
                        "a custom fusion component loads its own weights",
                    ));
                }
                let found = registry()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(name)
                    .cloned();
                let component = found.ok_or_else(|| {
                    let known = registered_components();
                    MlmfError::config(
                        "name",
                        format!(
                            "no fusion component is registered as `{name}` (registered: {}); \
                             register one with mlmf::fusion::register_component",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    )
                })?;
                return Self::with_component(dims, out_dim, component, &settings.required)
                    .map(|f| f.named(strategy.clone()));
            }
        };
        let tensors = p.finish(&format!("this `{}` fusion", strategy.name()))?;
        // A strategy without weights (late `similarity`) has nothing to train.
        let untrained = p_seeded && !tensors.is_empty();
        Ok(Self {
            strategy: strategy.clone(),
            modalities: dims.to_vec(),
            out_dim,
            required: settings.required.clone(),
            component,
            tensors,
            untrained,
        })
    }

    /// A fusion running a user component (its weights are its own business).
    pub fn with_component(
        dims: &[(Modality, usize)],
        out_dim: usize,
        component: Arc<dyn FusionComponent>,
        required: &[Modality],
    ) -> Result<Self> {
        check_layout(dims, out_dim, required)?;
        Ok(Self {
            strategy: FusionStrategy::Custom(crate::config::fusion::CustomOptions {
                name: "custom".into(),
            }),
            modalities: dims.to_vec(),
            out_dim,
            required: required.to_vec(),
            component,
            tensors: Vec::new(),
            untrained: false,
        })
    }

    fn named(mut self, strategy: FusionStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    pub fn strategy(&self) -> &FusionStrategy {
        &self.strategy
    }

    /// The modalities and their widths, in order.
    pub fn modalities(&self) -> &[(Modality, usize)] {
        &self.modalities
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn required(&self) -> &[Modality] {
        &self.required
    }

    /// Whether the weights are a seeded initialisation rather than loaded ones.
    pub fn is_untrained(&self) -> bool {
        self.untrained
    }

    /// The learned tensors' names (and shapes), in creation order.
    pub fn tensor_names(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    /// The learned tensors by name, in creation order (PyTorch's layout).
    pub fn named_tensors(&self) -> &[(String, Tensor)] {
        &self.tensors
    }

    /// Writes the weights to `path` (safetensors, the names [`Fusion::new`] reads).
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| {
            MlmfError::model_load("fusion weights", path, format!("cannot write: {e}"))
        })
    }

    /// Checks `inputs` against the fusion's modalities and widths.
    pub fn prepare(&self, inputs: &[(Modality, ModalityInput)]) -> Result<FusionInputs> {
        let mut values: Vec<Option<Prepared>> = vec![None; self.modalities.len()];
        let mut batch: Option<(usize, Modality)> = None;
        let mut device = Device::Cpu;
        for (m, input) in inputs {
            let Some(i) = self.modalities.iter().position(|(n, _)| n == m) else {
                return Err(MlmfError::input(
                    *m,
                    format!(
                        "not one of this fusion's modalities ({})",
                        names(&self.modalities)
                    ),
                ));
            };
            if values[i].is_some() {
                return Err(MlmfError::input(*m, "given twice"));
            }
            let p = prepare_one(*m, self.modalities[i].1, input)?;
            let b = p.tokens.dim(0).map_err(ce("fusion input"))?;
            match batch {
                None => batch = Some((b, *m)),
                Some((b0, m0)) if b0 != b => {
                    return Err(MlmfError::input(
                        *m,
                        format!("batch of {b} rows, but `{m0}` has {b0}"),
                    ))
                }
                Some(_) => {}
            }
            device = p.tokens.device().clone();
            values[i] = Some(p);
        }
        let Some((batch, _)) = batch else {
            return Err(MlmfError::MissingModality {
                modality: self.modalities[0].0,
                message: format!(
                    "no modality was given; the fusion takes {}",
                    names(&self.modalities)
                ),
            });
        };
        for r in &self.required {
            let i = self.modalities.iter().position(|(n, _)| n == r);
            if i.is_none_or(|i| values[i].is_none()) {
                return Err(MlmfError::MissingModality {
                    modality: *r,
                    message: "this fusion requires it".into(),
                });
            }
        }
        Ok(FusionInputs {
            modalities: self.modalities.clone(),
            values,
            batch,
            device,
        })
    }

    /// Fuses `inputs` (any subset of the modalities) into `[B, out_dim]`.
    pub fn forward(
        &self,
        inputs: &[(Modality, ModalityInput)],
        return_attention: bool,
    ) -> Result<FusionOutput> {
        let prepared = self.prepare(inputs)?;
        // Built-in strategies run with the pool kept awake (see `pool`); a custom
        // component may call back into Python, so it runs on the caller's thread. So
        // does a call too small for any of its products to go parallel (a few pooled
        // rows): entering the pool would cost more than the call; and one on a GPU,
        // where no CPU kernel runs (the helpers would only spin).
        let on_gpu = prepared
            .present()
            .any(|(_, _, p)| !p.tokens.device().is_cpu());
        let inline = on_gpu
            || matches!(self.strategy, FusionStrategy::Custom(_))
            || prepared
                .present()
                .map(|(_, _, p)| p.tokens.elem_count())
                .sum::<usize>()
                .saturating_mul(self.out_dim)
                < crate::kernels::PARALLEL_MIN_MACS;
        let out = if inline {
            self.component.fuse(&prepared, return_attention)?
        } else {
            crate::pool::with_awake_pool(|| self.component.fuse(&prepared, return_attention))?
        };
        let want = [prepared.batch, self.out_dim];
        if out.fused.dims() != want {
            let (_, m, _) = prepared
                .present()
                .next()
                .ok_or_else(|| MlmfError::Internal("fusion without inputs".into()))?;
            return Err(MlmfError::input(
                m,
                format!(
                    "the `{}` fusion returned shape {:?}, expected {want:?}",
                    self.strategy.name(),
                    out.fused.dims()
                ),
            ));
        }
        Ok(out)
    }
}

/// Checks one input: `[B, D]` or `[B, T, D]` float, `D = width`, `B, T >= 1`, finite;
/// a mask `[B, T]` of 0/1.
fn prepare_one(m: Modality, width: usize, input: &ModalityInput) -> Result<Prepared> {
    let x = &input.states;
    let bad = |msg: String| MlmfError::input(m, msg);
    let pooled_form = x.rank() == 2;
    let tokens = match x.dims() {
        [b, d] => x.reshape((*b, 1, *d)),
        [_, _, _] => Ok(x.clone()),
        other => {
            return Err(bad(format!(
                "expected [batch, {width}] or [batch, tokens, {width}], got shape {other:?}"
            )))
        }
    }
    .map_err(ce("fusion input"))?;
    let (b, t, d) = tokens.dims3().map_err(ce("fusion input"))?;
    if d != width {
        return Err(bad(format!(
            "expected width {width}, got {d} (shape {:?})",
            x.dims()
        )));
    }
    if b == 0 || t == 0 {
        return Err(bad(format!(
            "expected at least one row and one token, got shape {:?}",
            x.dims()
        )));
    }
    if !x.dtype().is_float() {
        return Err(bad(format!("expected a float array, got {:?}", x.dtype())));
    }
    let tokens = tokens.to_dtype(DType::F32).map_err(ce("fusion input"))?;
    check_finite(&tokens, m, "")?;
    let mask = match &input.mask {
        None => None,
        Some(_) if pooled_form => {
            return Err(bad(
                "a mask goes with token states [batch, tokens, width], not pooled embeddings"
                    .into(),
            ))
        }
        Some(mask) => Some(check_mask(mask, b, t, "", m)?),
    };
    Ok(Prepared {
        tokens,
        mask,
        pooled_form,
    })
}

/// `sum_t mask_t x_t / max(1, sum_t mask_t)` over the tokens of `x` `[B, T, D]`.
pub(crate) fn masked_mean(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let f = ce("masked mean");
    let Some(m) = mask else {
        return x.mean(1).map_err(f);
    };
    let sum = m
        .unsqueeze(2)
        .and_then(|m3| x.broadcast_mul(&m3))
        .and_then(|s| s.sum(1))
        .map_err(&f)?;
    let count = m.sum_keepdim(1).and_then(|c| c.maximum(1f32)).map_err(&f)?;
    sum.broadcast_div(&count).map_err(f)
}

/// Linear maps over the modalities' pooled inputs, evaluated as one matrix product.
///
/// Two forms share it:
/// - *concat*: one map `name` over the concatenation, `cat_m(x_m) W^T + b`. A missing
///   modality's slot is zero, which contributes exactly nothing.
/// - *per modality*: a map `name.{m}` per modality, combined with per-row weights
///   `s[b, m]`: `sum_m s[b, m] (x_m W_m^T + b_m)`. That is
///   `cat_m(s[:, m] x_m) [W_1 .. W_M]^T + s B`, so the inputs are scaled, laid side by
///   side, and multiplied once by the weights stacked along the input dimension;
///   `s[b, m] = 0` for a missing modality.
#[derive(Debug, Clone)]
pub(crate) struct Stacked {
    /// `[out, sum D_m]`, no bias.
    lin: Linear,
    /// `[out]` (concat) or `[M, out]` (per modality).
    bias: Option<Tensor>,
    per_modality: bool,
    widths: Vec<usize>,
}

impl Stacked {
    /// One map over the concatenation: `name.weight` `[out, sum D_m]`, `name.bias`.
    pub(crate) fn concat(
        p: &mut Params,
        name: &str,
        widths: &[usize],
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let (w, b) = p.linear_parts(name, widths.iter().sum(), out_dim, bias)?;
        Ok(Self {
            lin: Linear::from_parts(w, None)?,
            bias: b,
            per_modality: false,
            widths: widths.to_vec(),
        })
    }

    /// A map per modality, `name.{m}.weight` `[out, D_m]` and `name.{m}.bias`.
    pub(crate) fn per_modality(
        p: &mut Params,
        name: &str,
        dims: &[(Modality, usize)],
        out_dim: usize,
    ) -> Result<Self> {
        let f = ce("stacked projections");
        let mut ws = Vec::with_capacity(dims.len());
        let mut bs = Vec::with_capacity(dims.len());
        for (m, d) in dims {
            let (w, b) = p.linear_parts(&format!("{name}.{m}"), *d, out_dim, true)?;
            ws.push(w);
            bs.push(b.ok_or_else(|| MlmfError::Internal("projection without bias".into()))?);
        }
        Ok(Self {
            lin: Linear::from_parts(Tensor::cat(&ws, 1).map_err(&f)?, None)?,
            bias: Some(Tensor::stack(&bs, 0).map_err(f)?),
            per_modality: true,
            widths: dims.iter().map(|(_, d)| *d).collect(),
        })
    }

    /// `x` holds each modality's `[B, D_m]` input (`None` where missing); `scale` is
    /// `s` `[B, M]` (per modality; `None`: 1 for every modality).
    pub(crate) fn forward(&self, x: &[Option<Tensor>], scale: Option<&Tensor>) -> Result<Tensor> {
        let f = ce("stacked linear");
        let first = x
            .iter()
            .flatten()
            .next()
            .ok_or_else(|| MlmfError::Internal("stacked linear: no input".into()))?;
        let b = first.dim(0).map_err(&f)?;
        let host_scale: Option<Vec<f32>> = scale
            .map(|s| s.flatten_all().and_then(|s| s.to_vec1()))
            .transpose()
            .map_err(&f)?;
        let refs: Vec<Option<&Tensor>> = x.iter().map(Option::as_ref).collect();
        let bias = match (&self.bias, self.per_modality) {
            (None, _) => StackBias::None,
            (Some(t), false) => StackBias::Shared(t),
            (Some(t), true) => StackBias::PerModality(t),
        };
        if let Some(y) = cpu::stacked_linear(
            &self.lin,
            &refs,
            &self.widths,
            b,
            host_scale.as_deref(),
            bias,
        )? {
            return Ok(y);
        }
        // Elsewhere (a GPU): the same formula in tensor ops.
        let parts = x
            .iter()
            .zip(&self.widths)
            .enumerate()
            .map(|(m, (x, &d))| match (x, scale) {
                (Some(x), Some(s)) => s.narrow(1, m, 1).and_then(|s| x.broadcast_mul(&s)),
                (Some(x), None) => Ok(x.clone()),
                (None, _) => Tensor::zeros((b, d), DType::F32, first.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(&f)?;
        let y = self.lin.forward(&Tensor::cat(&parts, 1).map_err(&f)?)?;
        match &self.bias {
            None => Ok(y),
            Some(bias) if self.per_modality => {
                // s B over the present modalities only.
                let presence: Vec<f32> =
                    x.iter().map(|x| f32::from(u8::from(x.is_some()))).collect();
                let m = presence.len();
                let mut s = Tensor::from_vec(presence, (1, m), first.device()).map_err(&f)?;
                s = match scale {
                    Some(scale) => scale.broadcast_mul(&s),
                    None => s.broadcast_as((b, m)).and_then(|s| s.contiguous()),
                }
                .map_err(&f)?;
                s.matmul(bias).and_then(|sb| y + sb)
            }
            Some(bias) => y.broadcast_add(bias),
        }
        .map_err(f)
    }
}

/// `[B, M]`: 1 / (number present) for the present modalities, 0 for missing ones.
pub(crate) fn mean_weights(inputs: &FusionInputs) -> Result<Tensor> {
    let f = ce("modality mean");
    let presence = inputs.presence()?;
    let n = inputs.present().count().max(1);
    (presence / n as f64)
        .and_then(|p| p.unsqueeze(0))
        .and_then(|p| p.broadcast_as((inputs.batch, inputs.modalities.len())))
        .and_then(|p| p.contiguous())
        .map_err(f)
}

/// Softmax over the present modalities of `scores` `[B, M]`; missing ones get 0.
pub(crate) fn softmax_present(scores: &Tensor, presence: &Tensor) -> Result<Tensor> {
    let f = ce("modality softmax");
    // presence 1 -> bias 0; presence 0 -> MASKED.
    let bias = presence
        .affine(-f64::from(MASKED), f64::from(MASKED))
        .map_err(&f)?;
    scores
        .broadcast_add(&bias)
        .and_then(|s| candle_nn::ops::softmax_last_dim(&s))
        .and_then(|w| w.broadcast_mul(presence))
        .map_err(f)
}

/// The mean of the present `y_m`.
pub(crate) fn mean_present(y: &[Option<Tensor>]) -> Result<Tensor> {
    let f = ce("modality mean");
    let present: Vec<&Tensor> = y.iter().flatten().collect();
    let n = present.len();
    let mut acc = present
        .first()
        .map(|t| (*t).clone())
        .ok_or_else(|| MlmfError::Internal("modality mean: no input".into()))?;
    for t in &present[1..] {
        acc = (acc + *t).map_err(&f)?;
    }
    (acc / n as f64).map_err(f)
}

/// Per-modality linear maps `proj.{m}` from each width to `out_dim`.
pub(crate) fn projections(
    p: &mut Params,
    name: &str,
    dims: &[(Modality, usize)],
    out_dim: usize,
) -> Result<Vec<Linear>> {
    dims.iter()
        .map(|(m, d)| p.linear(&format!("{name}.{m}"), *d, out_dim, true))
        .collect()
}

#[cfg(test)]
mod tests;

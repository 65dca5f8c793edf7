//! The transformer pieces every supported encoder is made of: linear maps, layer norm,
//! activations, multi-head self-attention and the encoder layer (pre- or post-norm).
//!
//! Tensors are `[B, T, D]` in the model dtype. Half-precision models keep their weights
//! and activations in float16/bfloat16 but compute layer norm, softmax and activations
//! in float32, as PyTorch does on the CPU; bfloat16 matrix products run in float32
//! on the CPU because candle's CPU matmul has no bfloat16 kernel.

use candle_core::{DType, Device, Tensor, D};

use crate::encoders::checkpoint::Checkpoint;
use crate::encoders::config::Cfg;
use crate::error::{MlmfError, Result};
use crate::kernels::panel::Panels;

pub(crate) use crate::error::ce;

/// Where and in which precision a model's tensors live.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub device: Device,
    /// The dtype activations (and every weight that is not a linear map's) are in.
    pub dtype: DType,
    /// The format linear weights are kept in: on the CPU, 16-bit and int8 weights run
    /// on the float32 kernels with float32 activations.
    pub precision: crate::encoders::Precision,
    /// Bytes of the weights loaded so far (every tensor read through [`Weights`] and
    /// every linear map, in the format it is kept in).
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Receives the name of every linear weight an int8 load quantises.
    pub record: Option<Record>,
}

/// Where the names of linear weights quantised at load are recorded.
pub(crate) type Record = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

impl Placement {
    /// The CPU in float32.
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            precision: crate::encoders::Precision::F32,
            bytes: Default::default(),
            record: None,
        }
    }

    /// An [`EncoderInfo`](crate::encoders::EncoderInfo) for a model placed here.
    pub fn info(
        &self,
        modality: crate::modality::Modality,
        model_type: &str,
        hidden_size: usize,
        output_dim: usize,
        processor: crate::encoders::ProcessorKind,
    ) -> crate::encoders::EncoderInfo {
        crate::encoders::EncoderInfo {
            modality,
            model_type: model_type.to_string(),
            hidden_size,
            output_dim,
            processor,
            device: self.device.clone(),
            dtype: self.dtype,
        }
    }
}

/// Weight access with a name prefix, for one model inside a checkpoint.
#[derive(Clone, Copy)]
pub(crate) struct Weights<'a> {
    pub ckpt: &'a Checkpoint,
    pub place: &'a Placement,
}

impl<'a> Weights<'a> {
    /// The tensor `name` with `shape`, in the model dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .ckpt
            .tensor(name, shape, self.place.dtype, &self.place.device)?;
        self.count(&t);
        Ok(t)
    }

    /// Adds `t`'s bytes to the placement's total.
    pub fn count(&self, t: &Tensor) {
        self.place.bytes.fetch_add(
            (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The tensor `name` with `shape`, always float32 (norm parameters, biases added in
    /// float32).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .ckpt
            .tensor(name, shape, DType::F32, &self.place.device)?;
        self.count(&t);
        Ok(t)
    }

    /// A token embedding table `name` with `shape`: on the CPU in 16 bits when the
    /// weights are (rows are widened to float32 as they are gathered), else in the
    /// model dtype.
    pub fn get_table(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use crate::encoders::Precision;
        let half = matches!(self.place.precision, Precision::BF16 | Precision::F16);
        if !(self.place.device.is_cpu() && half) {
            return self.get(name, shape);
        }
        let t = self.ckpt.tensor(
            name,
            shape,
            self.place.precision.dtype(),
            &self.place.device,
        )?;
        self.count(&t);
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

/// `y = x W^T + b`, `W` given `[out, in]` as in PyTorch.
///
/// CPU maps loaded from a checkpoint keep `W^T` instead, in float32 or 16 bits: as
/// 16-column panels when the output width is a multiple of 16 (the layout the tile
/// reads, packed once here rather than on every call; [`crate::kernels::panel`]), else
/// contiguous `[in, out]`. Int8 maps keep their packed codes and scales
/// ([`crate::kernels::int8`]).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: LinearWeight,
    pub(crate) bias: Option<Tensor>,
    /// Whether a dense weight is stored `[in, out]`.
    pub(crate) transposed: bool,
}

/// A linear map's weight.
#[derive(Debug, Clone)]
pub(crate) enum LinearWeight {
    /// `[out, in]`, or `[in, out]` when the map is `transposed`.
    Dense(Tensor),
    /// `W^T` in float32 or 16 bits, as 16-column panels (CPU maps whose output width is
    /// a multiple of 16).
    Panels(std::sync::Arc<crate::kernels::panel::Panels>),
    /// Per-channel int8 codes of `W^T`, packed, with their scales.
    Int8(std::sync::Arc<crate::kernels::int8::Int8Matrix>),
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`), in the placement's
    /// precision.
    pub fn load(
        w: Weights<'_>,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        use crate::encoders::Precision;
        let wname = format!("{name}.weight");
        let place = w.place;
        let on_cpu = place.device.is_cpu();
        let fast = on_cpu && place.dtype == DType::F32;
        // The bias loads after the weight, so that a wrong shape names the weight.
        let load_bias = || -> Result<Option<Tensor>> {
            if !bias {
                return Ok(None);
            }
            let bname = format!("{name}.bias");
            Ok(Some(if fast {
                w.get_f32(&bname, &[out_dim])?
            } else {
                w.get(&bname, &[out_dim])?
            }))
        };
        let dense = |weight: Tensor, bias: Option<Tensor>| Self {
            weight: LinearWeight::Dense(weight),
            bias,
            transposed: true,
        };
        let stored = w.ckpt.stored_dtype(&wname);
        if stored == Some(safetensors::Dtype::I8) {
            return Self::load_int8(w, name, [out_dim, in_dim], load_bias);
        }
        let counted = |lin: Self| {
            let bias_bytes = lin
                .bias
                .as_ref()
                .map_or(0, |b| (b.elem_count() * b.dtype().size_in_bytes()) as u64);
            place.bytes.fetch_add(
                lin.bytes() - bias_bytes,
                std::sync::atomic::Ordering::Relaxed,
            );
            lin
        };
        if !fast || !w.contains(&wname) {
            let weight = w
                .ckpt
                .tensor(&wname, &[out_dim, in_dim], place.dtype, &place.device)?;
            return Self::from_parts(weight, load_bias()?).map(counted);
        }
        // A map int8 quantises (whatever this load's precision).
        if let Some(Ok(mut r)) = place.record.as_ref().map(|r| r.lock()) {
            r.push(wname.clone());
        }
        // Float32 and 16-bit maps: panels, packed straight from `[out, in]`.
        if place.precision != Precision::Int8 && Panels::fits(out_dim) {
            let weight = w
                .ckpt
                .tensor(&wname, &[out_dim, in_dim], DType::F32, &place.device)?;
            if let Some(p) = panels_of(&weight, place.precision.dtype()) {
                return Ok(counted(Self {
                    weight: LinearWeight::Panels(std::sync::Arc::new(p)),
                    bias: load_bias()?,
                    transposed: true,
                }));
            }
        }
        // W^T in float32, straight from the mapped file when it is stored so.
        let wt = match w.ckpt.tensor_transposed(&wname, [out_dim, in_dim])? {
            Some(wt) => wt,
            None => {
                let weight =
                    w.ckpt
                        .tensor(&wname, &[out_dim, in_dim], DType::F32, &place.device)?;
                crate::kernels::transpose(&weight)?
                    .ok_or_else(|| MlmfError::Internal("linear: transpose".into()))?
            }
        };
        let f = ce("linear weight");
        let bias = load_bias()?;
        let lin = match place.precision {
            Precision::F32 => dense(wt, bias),
            Precision::BF16 => dense(wt.to_dtype(DType::BF16).map_err(f)?, bias),
            Precision::F16 => dense(wt.to_dtype(DType::F16).map_err(f)?, bias),
            Precision::Int8 => {
                let data: Vec<f32> = wt.flatten_all().and_then(|t| t.to_vec1()).map_err(f)?;
                let (codes, scales) =
                    crate::kernels::int8::quantize_columns(&data, in_dim, out_dim);
                let m =
                    crate::kernels::int8::Int8Matrix::from_codes(&codes, scales, in_dim, out_dim)
                        .map_err(|e| w.ckpt.error(format!("weight `{wname}`: {e}")))?;
                Self {
                    weight: LinearWeight::Int8(std::sync::Arc::new(m)),
                    bias,
                    transposed: true,
                }
            }
        };
        Ok(counted(lin))
    }

    /// A pre-quantised map: `{name}.weight` int8 codes `[out, in]` and
    /// `{name}.weight_scale` `[out]`.
    fn load_int8(
        w: Weights<'_>,
        name: &str,
        [out_dim, in_dim]: [usize; 2],
        load_bias: impl FnOnce() -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let wname = format!("{name}.weight");
        if !(w.place.device.is_cpu() && w.place.dtype == DType::F32) {
            return Err(w.ckpt.error(format!(
                "weight `{wname}` is pre-quantised int8, which runs on the CPU in float32                  activations only: load it with device=\"cpu\" and dtype=\"int8\""
            )));
        }
        let sname = format!("{name}.weight_scale");
        if !w.contains(&sname) {
            return Err(w.ckpt.error(format!(
                "weight `{wname}` is int8 but `{sname}` is missing: a pre-quantised \
                 checkpoint stores one float32 scale per output channel"
            )));
        }
        let scale_t = w.ckpt.any_tensor(&sname)?;
        if scale_t.dims() != [out_dim] {
            return Err(w.ckpt.error(format!(
                "`{sname}` has shape {:?}, expected [{out_dim}] (one scale per output \
                 channel of `{wname}`)",
                scale_t.dims()
            )));
        }
        let scales: Vec<f32> = scale_t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_vec1())
            .map_err(ce("weight scale"))?;
        let codes = w.ckpt.int8_transposed(&wname, [out_dim, in_dim])?;
        let m = crate::kernels::int8::Int8Matrix::from_codes(&codes, scales, in_dim, out_dim)
            .map_err(|e| w.ckpt.error(format!("weight `{wname}`: {e}")))?;
        let bias = load_bias()?;
        w.place
            .bytes
            .fetch_add(m.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            weight: LinearWeight::Int8(std::sync::Arc::new(m)),
            bias,
            transposed: true,
        })
    }

    /// A linear map from an already loaded `[out, in]` weight: on the CPU in float32,
    /// `W^T` as panels (or contiguous when the output width is not a multiple of 16).
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if let Some(p) = panels_of(&weight, DType::F32) {
            return Ok(Self {
                weight: LinearWeight::Panels(std::sync::Arc::new(p)),
                bias,
                transposed: true,
            });
        }
        if let Some(weight) = crate::kernels::transpose(&weight)? {
            return Ok(Self {
                weight: LinearWeight::Dense(weight),
                bias,
                transposed: true,
            });
        }
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            transposed: false,
        })
    }

    /// The dense weight tensor (`None` for panels and int8).
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(t) => Some(t),
            LinearWeight::Panels(_) | LinearWeight::Int8(_) => None,
        }
    }

    /// Bytes the weight and bias occupy.
    pub fn bytes(&self) -> u64 {
        let t = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let w = match &self.weight {
            LinearWeight::Dense(d) => t(d),
            LinearWeight::Panels(p) => p.bytes() as u64,
            LinearWeight::Int8(m) => m.bytes() as u64,
        };
        w + self.bias.as_ref().map_or(0, t)
    }

    /// `s * (x W^T + b)` as one map: the weight and bias multiplied by `s`.
    pub fn scaled(&self, s: f32) -> Result<Self> {
        let f = ce("linear");
        Ok(Self {
            weight: match &self.weight {
                LinearWeight::Dense(w) => LinearWeight::Dense((w * f64::from(s)).map_err(&f)?),
                LinearWeight::Panels(p) => LinearWeight::Panels(std::sync::Arc::new(p.scaled(s))),
                LinearWeight::Int8(m) => LinearWeight::Int8(std::sync::Arc::new(m.scaled(s))),
            },
            bias: self
                .bias
                .as_ref()
                .map(|b| b * f64::from(s))
                .transpose()
                .map_err(f)?,
            transposed: self.transposed,
        })
    }

    /// The weight as PyTorch stores it, `[out, in]`.
    pub fn weight_out_in(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) if self.transposed => w
                .t()
                .and_then(|w| w.contiguous())
                .map_err(ce("linear weight")),
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Panels(p) => {
                let wt = Tensor::from_vec(p.to_f32(), (p.rows(), p.cols()), &Device::Cpu)
                    .and_then(|w| w.to_dtype(p.dtype()));
                wt.and_then(|w| w.t()?.contiguous())
                    .map_err(ce("linear weight"))
            }
            LinearWeight::Int8(_) => Err(MlmfError::Internal(
                "an int8 linear map keeps packed codes only; its float weight is not kept".into(),
            )),
        }
    }

    /// Output width.
    pub fn out_dim(&self) -> Result<usize> {
        match &self.weight {
            LinearWeight::Dense(w) => w.dim(usize::from(self.transposed)).map_err(ce("linear")),
            LinearWeight::Panels(p) => Ok(p.cols()),
            LinearWeight::Int8(m) => Ok(m.cols()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::encoders::cpu::linear_forward(self, x)? {
            return Ok(y);
        }
        let f = ce("linear");
        let weight = match &self.weight {
            LinearWeight::Dense(w) => w,
            LinearWeight::Panels(_) | LinearWeight::Int8(_) => {
                // The CPU kernels read contiguous float32 CPU rows.
                let x32 = x
                    .to_device(&Device::Cpu)
                    .and_then(|x| x.to_dtype(DType::F32))
                    .and_then(|x| x.contiguous())
                    .map_err(&f)?;
                let y = crate::encoders::cpu::linear_forward(self, &x32)?
                    .ok_or_else(|| MlmfError::Internal("linear: input".into()))?;
                return y
                    .to_device(x.device())
                    .and_then(|y| y.to_dtype(x.dtype()))
                    .map_err(f);
            }
        };
        let dims = x.dims().to_vec();
        let (rows, in_dim) = match dims.as_slice() {
            [.., last] => (x.elem_count() / last.max(&1), *last),
            [] => return Err(MlmfError::Internal("linear: scalar input".into())),
        };
        let x2 = x.reshape((rows, in_dim)).map_err(&f)?;
        let wt = if self.transposed {
            weight.clone()
        } else {
            weight.t().map_err(&f)?
        };
        let y = matmul(&x2.to_dtype(wt.dtype()).map_err(&f)?, &wt)?;
        let y = match &self.bias {
            Some(b) => y
                .broadcast_add(&b.to_dtype(y.dtype()).map_err(&f)?)
                .map_err(&f)?,
            None => y,
        };
        let y = y.to_dtype(x.dtype()).map_err(&f)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim()?;
        }
        y.reshape(out_dims).map_err(f)
    }
}

/// Panels in `dtype` of a float32 CPU weight `[out, in]` whose output width is a
/// multiple of 16; `None` for any other tensor.
fn panels_of(weight: &Tensor, dtype: DType) -> Option<Panels> {
    let (n, k) = weight.dims2().ok()?;
    if !Panels::fits(n) || !crate::kernels::is_plain_f32(weight) {
        return None;
    }
    let (storage, layout) = weight.storage_and_layout();
    let w = crate::kernels::slice(&storage, layout)?;
    Some(Panels::from_out_in(w, k, n, dtype))
}

/// A matrix product in the operands' dtype; bfloat16 on the CPU goes through float32.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let f = ce("matmul");
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        let a32 = a.to_dtype(DType::F32).map_err(&f)?;
        let b32 = b.to_dtype(DType::F32).map_err(&f)?;
        return a32
            .matmul(&b32)
            .and_then(|y| y.to_dtype(DType::BF16))
            .map_err(f);
    }
    a.matmul(b).map_err(f)
}

/// Layer norm over the last dimension, computed in float32.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f32,
}

impl LayerNorm {
    pub fn load(w: Weights<'_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_f32(&format!("{name}.weight"), &[dim])?,
            bias: w.get_f32(&format!("{name}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = ce("layer_norm");
        let dtype = x.dtype();
        let x32 = x
            .to_dtype(DType::F32)
            .map_err(&f)?
            .contiguous()
            .map_err(&f)?;
        let y = match crate::encoders::cpu::layer_norm_forward(
            &x32,
            &self.weight,
            &self.bias,
            self.eps,
        )? {
            Some(y) => y,
            None => {
                candle_nn::ops::layer_norm(&x32, &self.weight, &self.bias, self.eps).map_err(&f)?
            }
        };
        y.to_dtype(dtype).map_err(f)
    }
}

impl Activation {
    /// Parses a config's `hidden_act`; `field` names it in the error.
    pub fn parse(name: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(MlmfError::config(
                    field,
                    format!(
                        "unsupported activation {other:?}: expected gelu, gelu_new, \
                         gelu_pytorch_tanh, gelu_fast, quick_gelu, relu, silu or swish"
                    ),
                ))
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::encoders::cpu::activation_forward(*self, x)? {
            return Ok(y);
        }
        let f = ce("activation");
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32).map_err(&f)?;
        let y = match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => (&x * 1.702)
                .and_then(|s| candle_nn::ops::sigmoid(&s))
                .and_then(|s| x.mul(&s)),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
        .map_err(&f)?;
        y.to_dtype(dtype).map_err(f)
    }
}

pub(crate) use crate::kernels::{Activation, MASKED};

mod attention;
pub(crate) use attention::{
    attention, causal_bias, merge_heads, padding_bias, split_heads, AttnBias,
};

/// Self-attention with separate q/k/v projections and an output projection.
#[derive(Debug, Clone)]
pub(crate) struct SelfAttention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) heads: usize,
    pub(crate) scale: f64,
}

/// Tensor names of one attention block, relative to the layer.
pub(crate) struct AttentionNames<'a> {
    pub q: &'a str,
    pub k: &'a str,
    pub v: &'a str,
    pub o: &'a str,
    /// Whether the key projection has a bias (Whisper's has none).
    pub k_bias: bool,
}

impl SelfAttention {
    pub fn load(
        w: Weights<'_>,
        prefix: &str,
        names: &AttentionNames<'_>,
        dim: usize,
        heads: usize,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(w.ckpt.error(format!(
                "hidden size {dim} is not divisible by the number of attention heads {heads}"
            )));
        }
        let l = |n: &str, bias: bool| Linear::load(w, &format!("{prefix}{n}"), dim, dim, bias);
        Ok(Self::from_parts(
            l(names.q, true)?,
            l(names.k, names.k_bias)?,
            l(names.v, true)?,
            l(names.o, true)?,
            dim,
            heads,
        ))
    }

    /// From already loaded `[dim, dim]` projections; `heads` divides `dim` (checked by
    /// the caller).
    pub fn from_parts(
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        dim: usize,
        heads: usize,
    ) -> Self {
        Self {
            q,
            k,
            v,
            o,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
        }
    }

    /// Self-attention over `x`.
    pub fn forward(&self, x: &Tensor, bias: &AttnBias) -> Result<Tensor> {
        self.attend(x, x, bias)
    }

    /// `query` `[B, Tq, D]` attending over `context` `[B, Tk, D]`.
    pub fn attend(&self, query: &Tensor, context: &Tensor, bias: &AttnBias) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(query)?, self.heads)?;
        let k = split_heads(&self.k.forward(context)?, self.heads)?;
        let v = split_heads(&self.v.forward(context)?, self.heads)?;
        let y = attention(&q, &k, &v, self.scale, bias)?;
        self.o.forward(&merge_heads(&y)?)
    }
}

/// One transformer encoder layer: attention and a two-layer MLP, each with a residual
/// connection, the norms before (`pre_norm`: CLIP, SigLIP, ViT, Whisper) or after
/// (BERT) each block.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    pub attn: SelfAttention,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
    pub pre_norm: bool,
}

impl EncoderLayer {
    pub fn forward(&self, x: &Tensor, bias: &AttnBias) -> Result<Tensor> {
        let f = ce("encoder layer");
        if self.pre_norm {
            let h = self.attn.forward(&self.norm1.forward(x)?, bias)?;
            let x = (x + h).map_err(&f)?;
            let h = self.fc2.forward(
                &self
                    .act
                    .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?)?,
            )?;
            (x + h).map_err(f)
        } else {
            let h = self.attn.forward(x, bias)?;
            let x = self.norm1.forward(&(x + h).map_err(&f)?)?;
            let h = self
                .fc2
                .forward(&self.act.forward(&self.fc1.forward(&x)?)?)?;
            self.norm2.forward(&(x + h).map_err(f)?)
        }
    }
}

/// Tensor names of one encoder layer, relative to the layer's prefix.
pub(crate) struct LayerNames<'a> {
    pub attention: AttentionNames<'a>,
    pub norm1: &'a str,
    pub fc1: &'a str,
    pub fc2: &'a str,
    pub norm2: &'a str,
    /// Norms before each block (CLIP, SigLIP, ViT, Whisper) or after (BERT).
    pub pre_norm: bool,
}

/// The sizes of a stack of encoder layers, as most configs name them.
pub(crate) struct Sizes {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub inter: usize,
    pub eps: f64,
    pub act: Activation,
}

impl Sizes {
    /// `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `intermediate_size`,
    /// `layer_norm_eps` and `hidden_act` of `cfg`, with the config class's defaults.
    pub fn read(cfg: Cfg<'_>, defaults: (usize, usize, usize, usize, f64, &str)) -> Result<Self> {
        let (hidden, layers, heads, inter, eps, act) = defaults;
        Ok(Self {
            hidden: cfg.size("hidden_size", hidden)?,
            layers: cfg.size("num_hidden_layers", layers)?,
            heads: cfg.size("num_attention_heads", heads)?,
            inter: cfg.size("intermediate_size", inter)?,
            eps: cfg.positive("layer_norm_eps", eps)?,
            act: Activation::parse(cfg.string("hidden_act", act)?, &cfg.name("hidden_act"))?,
        })
    }
}

/// Loads layers `0..s.layers`, layer `i` under `{prefix}{i}.`.
pub(crate) fn load_layers(
    w: Weights<'_>,
    prefix: &str,
    names: &LayerNames<'_>,
    s: &Sizes,
) -> Result<Vec<EncoderLayer>> {
    (0..s.layers)
        .map(|i| {
            let l = format!("{prefix}{i}.");
            let n = |name: &str| format!("{l}{name}");
            Ok(EncoderLayer {
                attn: SelfAttention::load(w, &l, &names.attention, s.hidden, s.heads)?,
                norm1: LayerNorm::load(w, &n(names.norm1), s.hidden, s.eps)?,
                fc1: Linear::load(w, &n(names.fc1), s.hidden, s.inter, true)?,
                fc2: Linear::load(w, &n(names.fc2), s.inter, s.hidden, true)?,
                norm2: LayerNorm::load(w, &n(names.norm2), s.hidden, s.eps)?,
                act: s.act,
                pre_norm: names.pre_norm,
            })
        })
        .collect()
}

/// Row lookups `table[ids]` for int64 ids `[B, T]` (checked against the table size by
/// the caller) -> `[B, T, D]`.
pub(crate) fn embed(table: &Tensor, ids: &ndarray::Array2<i64>, device: &Device) -> Result<Tensor> {
    let f = ce("embedding");
    let (b, t) = ids.dim();
    let flat: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let idx = Tensor::from_vec(flat, b * t, device).map_err(&f)?;
    let d = table.dim(1).map_err(&f)?;
    let rows = table
        .index_select(&idx, 0)
        .and_then(|x| x.reshape((b, t, d)))
        .map_err(&f)?;
    // On the CPU activations are float32 whatever the weights' format.
    if table.device().is_cpu() && table.dtype() != DType::F32 {
        return rows.to_dtype(DType::F32).map_err(f);
    }
    Ok(rows)
}

/// Runs `layers` in order (float32 CPU models through [`crate::encoders::cpu`]).
pub(crate) fn run_layers(layers: &[EncoderLayer], x: Tensor, bias: &AttnBias) -> Result<Tensor> {
    if let Some(y) = crate::encoders::cpu::run_layers(layers, &x, bias)? {
        return Ok(y);
    }
    layers.iter().try_fold(x, |x, l| l.forward(&x, bias))
}

/// Non-overlapping `P x P` patches of `[B, C, H, W]` pixels as rows `[B, N, C*P*P]`
/// (row-major over the patch grid, channel-major inside a patch, as a stride-`P`
/// convolution reads them), so that a patch embedding is one matrix product.
pub(crate) fn patchify(pixels: &Tensor, patch: usize) -> Result<Tensor> {
    let f = ce("patchify");
    let (b, c, h, w) = pixels.dims4().map_err(&f)?;
    let (gh, gw) = (h / patch, w / patch);
    pixels
        .reshape(&[b, c, gh, patch, gw, patch][..])
        .and_then(|x| x.permute(&[0usize, 2, 4, 1, 3, 5][..]))
        .and_then(|x| x.contiguous())
        .and_then(|x| x.reshape((b, gh * gw, c * patch * patch)))
        .map_err(f)
}

/// A patch embedding: a `[D, C, P, P]` convolution with stride `P`, as a linear map.
pub(crate) fn load_patch_embedding(
    w: Weights<'_>,
    name: &str,
    dim: usize,
    channels: usize,
    patch: usize,
    bias: bool,
) -> Result<Linear> {
    let weight = w.get(&format!("{name}.weight"), &[dim, channels, patch, patch])?;
    let weight = weight
        .reshape((dim, channels * patch * patch))
        .map_err(ce("patch embedding"))?;
    let bias = if bias {
        Some(w.get(&format!("{name}.bias"), &[dim])?)
    } else {
        None
    };
    Linear::from_parts(weight, bias)
}

/// Rows `[B, D]` of `x` `[B, T, D]` at one position per batch row.
pub(crate) fn gather_rows(x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let f = ce("gather rows");
    let rows = positions
        .iter()
        .enumerate()
        .map(|(b, &t)| x.get(b).and_then(|r| r.get(t)))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(&f)?;
    Tensor::stack(&rows, 0).map_err(f)
}

/// Mean over the positions where `mask` (`[B, T]`, 0/1) is set; rows with no set
/// position give zeros.
pub(crate) fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let f = ce("masked mean");
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32).map_err(&f)?;
    let m = mask
        .to_dtype(DType::F32)
        .map_err(&f)?
        .unsqueeze(2)
        .map_err(&f)?;
    let sum = x.broadcast_mul(&m).and_then(|s| s.sum(1)).map_err(&f)?;
    let count = m
        .sum(1)
        .and_then(|c| c.clamp(1e-9f32, f32::MAX))
        .map_err(&f)?;
    sum.broadcast_div(&count)
        .and_then(|y| y.to_dtype(dtype))
        .map_err(f)
}

/// `x / max(||x||, 1e-12)` along the last dimension (`torch.nn.functional.normalize`).
pub(crate) fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let f = ce("normalize");
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32).map_err(&f)?;
    let norm = x
        .sqr()
        .and_then(|s| s.sum_keepdim(D::Minus1))
        .and_then(|s| s.sqrt())
        .and_then(|s| s.clamp(1e-12f32, f32::MAX))
        .map_err(&f)?;
    x.broadcast_div(&norm)
        .and_then(|y| y.to_dtype(dtype))
        .map_err(f)
}

/// The largest absolute difference between two tensors of one shape (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_orders_rows_like_a_strided_convolution() {
        // [1, 2, 4, 6] pixels, patch 2: a 2x3 grid of patches, 2*2*2 values each.
        let v: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let px = Tensor::from_vec(v, (1, 2, 4, 6), &Device::Cpu).unwrap();
        let rows = patchify(&px, 2).unwrap();
        assert_eq!(rows.dims(), &[1, 6, 8]);
        let rows = rows.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for gy in 0..2 {
            for gx in 0..3 {
                let n = gy * 3 + gx;
                for c in 0..2 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let want = (c * 24 + (gy * 2 + dy) * 6 + gx * 2 + dx) as f32;
                            assert_eq!(rows[n * 8 + c * 4 + dy * 2 + dx], want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activations_by_config_name() {
        assert_eq!(
            Activation::parse("gelu_pytorch_tanh", "x").unwrap(),
            Activation::GeluTanh
        );
        let err = Activation::parse("swoosh", "config.json: hidden_act").unwrap_err();
        assert!(err.to_string().contains("config.json: hidden_act"));
        let x = Tensor::new(&[-1f32, 0., 2.], &Device::Cpu).unwrap();
        let y = Activation::QuickGelu
            .forward(&x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f32> = [-1f32, 0., 2.]
            .iter()
            .map(|v| v / (1. + (-1.702 * v).exp()))
            .collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}

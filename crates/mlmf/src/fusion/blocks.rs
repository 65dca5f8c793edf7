//! Building blocks the fusion strategies share: norms, MLPs and residual gates.
//!
//! Weights are given in PyTorch's layout (`[out, in]`); the tensor names each block
//! reads below its prefix are in docs/fusion.md.

use candle_core::{DType, Tensor};

use crate::config::fusion::{GateKind, MlpKind, NormKind};
use crate::encoders::layers::{self, ce, Activation, Linear};
use crate::error::{MlmfError, Result};

use super::params::{Init, Params};

fn vector(t: &Tensor, what: &str) -> Result<usize> {
    match t.dims() {
        [d] => Ok(*d),
        other => Err(MlmfError::config(
            what,
            format!("expected a vector, got shape {other:?}"),
        )),
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (the
/// encoders' LayerNorm).
#[derive(Debug, Clone)]
pub struct LayerNorm(pub(crate) layers::LayerNorm);

impl LayerNorm {
    pub const EPS: f32 = 1e-5;

    pub fn new(weight: Tensor, bias: Tensor, eps: f32) -> Result<Self> {
        if vector(&weight, "weight")? != vector(&bias, "bias")? {
            return Err(MlmfError::config(
                "bias",
                format!(
                    "{:?} does not match weight {:?}",
                    bias.dims(),
                    weight.dims()
                ),
            ));
        }
        let f = ce("layer norm");
        Ok(Self(layers::LayerNorm {
            weight: weight.to_dtype(DType::F32).map_err(&f)?,
            bias: bias.to_dtype(DType::F32).map_err(f)?,
            eps,
        }))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub const EPS: f32 = 1e-6;

    pub fn new(weight: Tensor, eps: f32) -> Result<Self> {
        vector(&weight, "weight")?;
        Ok(Self {
            weight: weight.to_dtype(DType::F32).map_err(ce("rms norm"))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous().map_err(ce("rms norm"))?;
        candle_nn::ops::rms_norm(&x, &self.weight, self.eps).map_err(ce("rms norm"))
    }
}

/// LayerNorm or RMSNorm.
#[derive(Debug, Clone)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }

    /// `{name}.weight` (and `{name}.bias` for LayerNorm) of width `dim`.
    pub(crate) fn take(p: &mut Params, name: &str, kind: NormKind, dim: usize) -> Result<Self> {
        let w = p.tensor(&format!("{name}.weight"), &[dim], Init::Ones)?;
        Ok(match kind {
            NormKind::Layer => {
                let b = p.tensor(&format!("{name}.bias"), &[dim], Init::Zeros)?;
                Self::Layer(LayerNorm::new(w, b, LayerNorm::EPS)?)
            }
            NormKind::Rms => Self::Rms(RmsNorm::new(w, RmsNorm::EPS)?),
        })
    }
}

/// A transformer MLP: `fc2(gelu(fc1(x)))` or `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `fc1` or `gate_proj`.
    pub(crate) first: Linear,
    /// `up_proj` (SwiGLU only).
    pub(crate) up: Option<Linear>,
    /// `fc2` or `down_proj`.
    pub(crate) last: Linear,
}

impl Mlp {
    /// GELU MLP from `fc1` `[h, d]` + bias and `fc2` `[d, h]` + bias.
    pub fn gelu(fc1: (Tensor, Tensor), fc2: (Tensor, Tensor)) -> Result<Self> {
        Ok(Self {
            first: Linear::from_parts(fc1.0, Some(fc1.1))?,
            up: None,
            last: Linear::from_parts(fc2.0, Some(fc2.1))?,
        })
    }

    /// SwiGLU MLP from `gate_proj`, `up_proj` `[h, d]` and `down_proj` `[d, h]`, no biases.
    pub fn swiglu(gate: Tensor, up: Tensor, down: Tensor) -> Result<Self> {
        if gate.dims() != up.dims() {
            return Err(MlmfError::config(
                "up_proj",
                format!("{:?} does not match gate_proj {:?}", up.dims(), gate.dims()),
            ));
        }
        Ok(Self {
            first: Linear::from_parts(gate, None)?,
            up: Some(Linear::from_parts(up, None)?),
            last: Linear::from_parts(down, None)?,
        })
    }

    pub(crate) fn take(
        p: &mut Params,
        name: &str,
        kind: MlpKind,
        dim: usize,
        hidden: usize,
    ) -> Result<Self> {
        Ok(match kind {
            MlpKind::Gelu => Self {
                first: p.linear(&format!("{name}.fc1"), dim, hidden, true)?,
                up: None,
                last: p.linear(&format!("{name}.fc2"), hidden, dim, true)?,
            },
            MlpKind::Swiglu => Self {
                first: p.linear(&format!("{name}.gate_proj"), dim, hidden, false)?,
                up: Some(p.linear(&format!("{name}.up_proj"), dim, hidden, false)?),
                last: p.linear(&format!("{name}.down_proj"), hidden, dim, false)?,
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.first.forward(x)?;
        let h = match &self.up {
            None => Activation::Gelu.forward(&h)?,
            Some(up) => {
                let gate = Activation::Silu.forward(&h)?;
                (gate * up.forward(x)?).map_err(ce("swiglu"))?
            }
        };
        self.last.forward(&h)
    }
}

/// `tanh(alpha) * y` (Flamingo's gate: alpha starts at 0, the gated branch is off).
#[derive(Debug, Clone)]
pub struct TanhGate {
    alpha: f32,
}

impl TanhGate {
    pub fn new(alpha: f32) -> Self {
        Self { alpha }
    }

    /// `tanh(alpha)`, the factor the gate multiplies by.
    pub fn factor(&self) -> f32 {
        self.alpha.tanh()
    }

    pub fn forward(&self, y: &Tensor) -> Result<Tensor> {
        (y * f64::from(self.factor())).map_err(ce("tanh gate"))
    }
}

/// `sigmoid(x W^T + b) * y`, elementwise (a vision-language gate).
#[derive(Debug, Clone)]
pub struct SigmoidGate {
    lin: Linear,
}

impl SigmoidGate {
    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            lin: Linear::from_parts(weight, Some(bias))?,
        })
    }

    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let g = self.lin.forward(x)?;
        candle_nn::ops::sigmoid(&g)
            .and_then(|g| g * y)
            .map_err(ce("sigmoid gate"))
    }
}

/// The residual gate of a fusion layer, `G(x, y)`.
#[derive(Debug, Clone)]
pub enum Gate {
    None,
    Tanh(TanhGate),
    Sigmoid(SigmoidGate),
}

impl Gate {
    pub(crate) fn take(p: &mut Params, name: &str, kind: GateKind, dim: usize) -> Result<Self> {
        Ok(match kind {
            GateKind::None => Self::None,
            GateKind::Tanh => {
                let a = p.tensor(name, &[1], Init::Zeros)?;
                let a = a
                    .flatten_all()
                    .and_then(|a| a.to_vec1::<f32>())
                    .map_err(ce("tanh gate"))?;
                Self::Tanh(TanhGate::new(a[0]))
            }
            GateKind::Sigmoid => {
                let (w, b) = p.linear_parts(name, dim, dim, true)?;
                let b = b.ok_or_else(|| MlmfError::Internal("sigmoid gate: no bias".into()))?;
                Self::Sigmoid(SigmoidGate::new(w, b)?)
            }
        })
    }

    /// `G(x, y)`: `y` gated by `x` (the residual stream the branch adds to).
    pub fn forward(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(y.clone()),
            Self::Tanh(g) => g.forward(y),
            Self::Sigmoid(g) => g.forward(x, y),
        }
    }
}

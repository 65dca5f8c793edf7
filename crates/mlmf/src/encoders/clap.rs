//! CLAP (`model_type: clap`), as transformers' `ClapModel`: an audio tower (HTSAT,
//! [`crate::encoders::htsat`]) and a RoBERTa text tower, each followed by its
//! projection (`linear1`, the `projection_hidden_act`, `linear2`) into one space.
//!
//! `pooled` is the projected vector before normalisation (what `get_audio_features`
//! / `get_text_features` normalise): the audio tower's mean token through
//! `audio_projection`, the text tower's pooler output (`tanh(W h_CLS + b)`) through
//! `text_projection`. `hidden_states` are the towers' own token states. The aligned
//! heads (`logit_scale_t`, `logit_scale_a`) are read by [`crate::aligned`].

use crate::encoders::bert;
use crate::encoders::config::Cfg;
use crate::encoders::htsat::{self, Htsat};
use crate::encoders::layers::{Activation, Linear, Weights};
use crate::encoders::registry::LoadRequest;
use crate::encoders::{
    ChunkPooling, EncoderInfo, EncoderInput, EncoderOutput, ModalityEncoder, ProcessorKind,
};
use crate::error::Result;
use crate::modality::Modality;

/// `linear2(act(linear1(x)))`.
struct Projection {
    linear1: Linear,
    act: Activation,
    linear2: Linear,
}

impl Projection {
    fn load(
        w: Weights<'_>,
        name: &str,
        hidden: usize,
        dim: usize,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            linear1: Linear::load(w, &format!("{name}.linear1"), hidden, dim, true)?,
            act,
            linear2: Linear::load(w, &format!("{name}.linear2"), dim, dim, true)?,
        })
    }

    fn forward(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        self.linear2
            .forward(&self.act.forward(&self.linear1.forward(x)?)?)
    }
}

/// CLAP's audio tower with its projection.
pub struct ClapAudio {
    encoder: Htsat,
    projection: Projection,
    info: EncoderInfo,
}

/// CLAP's text tower with its projection.
pub struct ClapText {
    tower: bert::Bert,
    projection: Projection,
    info: EncoderInfo,
}

/// The projection width and activation: the root config's, else the tower's.
fn projection_of(root: Cfg<'_>, tower: Cfg<'_>) -> Result<(usize, Activation)> {
    let dim = root.size("projection_dim", tower.size("projection_dim", 512)?)?;
    let name = root.string(
        "projection_hidden_act",
        tower.string("projection_hidden_act", "relu")?,
    )?;
    Ok((
        dim,
        Activation::parse(name, &root.name("projection_hidden_act"))?,
    ))
}

/// Loads the tower of a CLAP checkpoint the request's modality selects (audio by
/// default).
pub fn load(req: &LoadRequest<'_>) -> Result<Box<dyn ModalityEncoder>> {
    let modality = req.check_modality(&[Modality::Audio, Modality::Text])?;
    let ckpt = req.checkpoint;
    let root = Cfg::new(ckpt.config(), "");
    let place = req.placement();
    let w = Weights {
        ckpt,
        place: &place,
    };
    if modality == Modality::Text {
        let cfg = root.sub("text_config");
        let (dim, act) = projection_of(root, cfg)?;
        let tower = bert::load_tower(req, cfg, "roberta", Some("text_model."))?;
        let hidden = tower.info().hidden_size;
        let processor = tower.info().processor;
        return Ok(Box::new(ClapText {
            projection: Projection::load(w, "text_projection", hidden, dim, act)?,
            info: place.info(Modality::Text, "clap", hidden, dim, processor),
            tower,
        }));
    }
    let cfg = root.sub("audio_config");
    let (dim, act) = projection_of(root, cfg)?;
    let encoder = htsat::load(cfg, w, "audio_model.audio_encoder.")?;
    let hidden = encoder.width;
    let n_mels = cfg.size("num_mel_bins", 64)?;
    Ok(Box::new(ClapAudio {
        projection: Projection::load(w, "audio_projection", hidden, dim, act)?,
        info: place.info(
            Modality::Audio,
            "clap",
            hidden,
            dim,
            ProcessorKind::Audio { n_mels, frames: 0 },
        ),
        encoder,
    }))
}

impl ModalityEncoder for ClapAudio {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    /// Long audio: the mean of the chunks' projected vectors.
    fn chunk_pooling(&self) -> ChunkPooling {
        ChunkPooling::MeanOfChunks
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let (hidden_states, mask, pooled) = self.encoder.forward(input)?;
        Ok(EncoderOutput {
            pooled: self.projection.forward(&pooled)?,
            hidden_states,
            mask,
        })
    }
}

impl ModalityEncoder for ClapText {
    fn info(&self) -> &EncoderInfo {
        &self.info
    }

    fn encode(&self, input: &EncoderInput) -> Result<EncoderOutput> {
        let out = self.tower.encode(input)?;
        Ok(EncoderOutput {
            pooled: self.projection.forward(&out.pooled)?,
            ..out
        })
    }
}

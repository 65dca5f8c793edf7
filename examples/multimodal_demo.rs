//! Fuses text and image embeddings: builds a config, runs cross-modal attention from
//! the text tokens over the image patches, fuses both modalities, and prints the
//! fused shape and a summary of the attention.
//!
//! ```sh
//! cargo run --release --example multimodal_demo
//! cargo run --release --example multimodal_demo -- <text_model_dir> <image_model_dir> a.jpg b.png
//! ```
//!
//! Without arguments the embeddings are seeded stand-ins of the usual shapes (6 text
//! tokens of width 384, 50 image patches of width 512, two rows). With two checkpoint
//! directories and images, the text encoder embeds one caption per image and the image
//! encoder the images. The attention and fusion layers are untrained (seeded) unless
//! you give them weights files, so the numbers show the mechanics, not meaning.

use candle_core::{DType, Device, Tensor, D};
use mlmf::attention::{average_heads, CrossModalAttention};
use mlmf::config::fusion::{LayerStackOptions, MlpKind, NormKind};
use mlmf::config::{FusionStrategy, ModalityConfig, MultiModalConfig};
use mlmf::encoders::{Encoder, EncoderOptions};
use mlmf::fusion::{Fusion, FusionSettings, ModalityInput};
use mlmf::preprocess::image::ImageRef;
use mlmf::preprocess::Source;
use mlmf::{MlmfError, Modality};

fn ce(e: candle_core::Error) -> MlmfError {
    MlmfError::Internal(e.to_string())
}

/// `(tokens [B, T, D], mask [B, T])` for text and image.
type Side = (Tensor, Tensor);

fn stand_ins(dev: &Device) -> mlmf::Result<(Side, Side)> {
    let side = |b: usize, t: usize, d: usize, seed: u64| -> mlmf::Result<Side> {
        let mut s = seed;
        let v: Vec<f32> = (0..b * t * d)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        let x = Tensor::from_vec(v, (b, t, d), dev).map_err(ce)?;
        let mut m = vec![1u8; b * t];
        if t > 4 {
            // The second row's last two tokens are padding.
            m[2 * t - 2..].iter_mut().for_each(|x| *x = 0);
        }
        Ok((x, Tensor::from_vec(m, (b, t), dev).map_err(ce)?))
    };
    Ok((side(2, 6, 384, 1)?, side(2, 50, 512, 2)?))
}

fn encoded(args: &[String]) -> mlmf::Result<(Side, Side)> {
    let [text_dir, image_dir, images @ ..] = args else {
        unreachable!("checked by the caller")
    };
    let text = Encoder::from_pretrained(text_dir, &EncoderOptions::default())?;
    let image = Encoder::from_pretrained(image_dir, &EncoderOptions::default())?;
    let captions: Vec<String> = images.iter().map(|p| format!("a photo: {p}")).collect();
    let t = text.encode_texts(&captions)?;
    let sources: Vec<Source> = images.iter().map(|p| Source::Path(p.into())).collect();
    let refs: Vec<ImageRef<'_>> = sources.iter().map(ImageRef::Source).collect();
    let i = image.encode_images(&refs)?;
    let f32s = |x: Tensor| x.to_dtype(DType::F32).map_err(ce);
    Ok((
        (f32s(t.hidden_states)?, t.mask),
        (f32s(i.hidden_states)?, i.mask),
    ))
}

fn main() -> mlmf::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dev = Device::Cpu;
    let ((text, text_mask), (image, image_mask)) = match args.len() {
        0 => stand_ins(&dev)?,
        n if n >= 3 => encoded(&args)?,
        _ => {
            eprintln!("usage: multimodal_demo [<text_model_dir> <image_model_dir> <image>...]");
            std::process::exit(2);
        }
    };
    let (td, id) = (
        text.dim(D::Minus1).map_err(ce)?,
        image.dim(D::Minus1).map_err(ce)?,
    );

    // 1. A config: two modalities, middle fusion, 8-head cross-modal attention.
    let mut config = MultiModalConfig::default();
    for m in [Modality::Text, Modality::Image] {
        config.modalities.insert(m, ModalityConfig::default());
    }
    config.fusion.strategy = FusionStrategy::Middle(LayerStackOptions {
        num_layers: 2,
        num_heads: 8,
        mlp: MlpKind::Swiglu,
        norm: NormKind::Rms,
        ..Default::default()
    });
    config.cross_modal_attention.num_heads = 8;
    config.validate()?;
    println!(
        "config: modalities {:?}, fusion `{}`, {} attention heads",
        config.enabled_modalities(),
        config.fusion.strategy.name(),
        config.cross_modal_attention.num_heads
    );

    // 2. Text tokens attend over image patches.
    let att = CrossModalAttention::new(td, id, &config.cross_modal_attention, 0, &dev)?;
    let out = att.forward(&text, &image, Some(&text_mask), Some(&image_mask), true)?;
    let w = out
        .weights
        .ok_or_else(|| MlmfError::Internal("no weights".into()))?;
    let mean = average_heads(&w)?; // [B, Tq, Tk]
    let rows: Vec<Vec<Vec<f32>>> = mean.to_vec3().map_err(ce)?;
    let tmask: Vec<Vec<u8>> = text_mask
        .to_dtype(DType::U8)
        .and_then(|m| m.to_vec2())
        .map_err(ce)?;
    println!(
        "cross-modal attention text -> image: output {:?}, weights {:?} (untrained: {})",
        out.output.dims(),
        w.dims(),
        att.is_untrained()
    );
    for (b, (row, m)) in rows.iter().zip(&tmask).enumerate() {
        let real: Vec<&Vec<f32>> = row
            .iter()
            .zip(m)
            .filter(|(_, &m)| m == 1)
            .map(|(r, _)| r)
            .collect();
        let mut summary = Vec::new();
        for (i, keys) in real.iter().enumerate() {
            let (j, top) =
                keys.iter().enumerate().fold(
                    (0, f32::MIN),
                    |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc },
                );
            let n = keys.iter().filter(|&&v| v > 0.0).count().max(2);
            let entropy: f32 = keys
                .iter()
                .filter(|&&v| v > 0.0)
                .map(|&v| -v * v.ln())
                .sum();
            summary.push(format!(
                "token {i} -> patch {j} ({top:.3}, entropy {:.2} of max)",
                entropy / (n as f32).ln()
            ));
        }
        println!("  row {b}: {}", summary.join("; "));
    }

    // 3. Fuse both modalities with the configured strategy.
    let fusion = Fusion::new(
        &config.fusion.strategy,
        &[(Modality::Text, td), (Modality::Image, id)],
        512,
        &FusionSettings::default(),
        &dev,
    )?;
    let fused = fusion.forward(
        &[
            (
                Modality::Text,
                ModalityInput::tokens(text.clone(), Some(text_mask.clone())),
            ),
            (
                Modality::Image,
                ModalityInput::tokens(image, Some(image_mask)),
            ),
        ],
        true,
    )?;
    println!(
        "fusion `{}`: fused {:?} from {} learned tensors (untrained: {}); attention maps {:?}",
        fusion.strategy().name(),
        fused.fused.dims(),
        fusion.tensor_names().len(),
        fusion.is_untrained(),
        fused
            .attention
            .iter()
            .map(|(n, w)| format!("{n} {:?}", w.dims()))
            .collect::<Vec<_>>()
    );
    // Text alone: the image is masked out, the text still gets a fused embedding.
    let alone = fusion.forward(
        &[(Modality::Text, ModalityInput::tokens(text, Some(text_mask)))],
        false,
    )?;
    println!(
        "fusion with the image missing: fused {:?}",
        alone.fused.dims()
    );
    Ok(())
}

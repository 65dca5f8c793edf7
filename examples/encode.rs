//! Encodes images or texts with a Hugging Face checkpoint directory.
//!
//! ```sh
//! cargo run --release --example encode -- <checkpoint_dir> image a.jpg b.png
//! cargo run --release --example encode -- <checkpoint_dir> text "a cat" "a dog"
//! ```
//!
//! Prints each input's pooled embedding width and the cosine similarity of every pair.

use mlmf::encoders::{Encoder, EncoderOptions};
use mlmf::preprocess::image::ImageRef;
use mlmf::preprocess::Source;
use mlmf::Modality;

fn main() -> mlmf::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, modality, inputs @ ..] = args.as_slice() else {
        eprintln!("usage: encode <checkpoint_dir> <image|text> <inputs>...");
        std::process::exit(2);
    };
    let modality: Modality = modality.parse()?;
    let options = EncoderOptions {
        modality: Some(modality),
        ..Default::default()
    };
    let encoder = Encoder::from_pretrained(dir, &options)?;
    let out = match modality {
        Modality::Text => encoder.encode_texts(inputs)?,
        _ => {
            let sources: Vec<Source> = inputs.iter().map(|p| Source::Path(p.into())).collect();
            let refs: Vec<ImageRef<'_>> = sources.iter().map(ImageRef::Source).collect();
            encoder.encode_images(&refs)?
        }
    };
    let pooled: Vec<Vec<f32>> = out
        .pooled
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec2())
        .map_err(|e| mlmf::MlmfError::Internal(e.to_string()))?;
    println!(
        "{} {} encoder: {} inputs -> pooled [{}, {}], hidden_states {:?}",
        encoder.model().model_type(),
        modality,
        inputs.len(),
        pooled.len(),
        encoder.model().output_dim(),
        out.hidden_states.dims()
    );
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for i in 0..pooled.len() {
        for j in i + 1..pooled.len() {
            let dot: f32 = pooled[i].iter().zip(&pooled[j]).map(|(a, b)| a * b).sum();
            let cos = dot / (norm(&pooled[i]) * norm(&pooled[j]));
            println!("cos({}, {}) = {cos:.4}", inputs[i], inputs[j]);
        }
    }
    Ok(())
}

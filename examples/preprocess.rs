//! Preprocess one input per modality from Rust and print the shapes.
//!
//! ```text
//! cargo run --release --example preprocess -- [IMAGE] [AUDIO] [VIDEO] [TOKENIZER_DIR]
//! ```
//! Without arguments it uses the sample media bundled with the Python package.

use std::path::PathBuf;

use mlmf::preprocess::audio::{AudioInput, AudioProcessor, AudioProcessorConfig};
use mlmf::preprocess::image::{ImageInput, ImageProcessor, ImageProcessorConfig};
use mlmf::preprocess::text::{TextProcessor, TextProcessorConfig};
use mlmf::preprocess::video::{VideoInput, VideoProcessor, VideoProcessorConfig};
use mlmf::preprocess::Source;

fn main() -> mlmf::Result<()> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python/mlmf/data");
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let image = args.next().unwrap_or_else(|| data.join("sample.jpg"));
    let audio = args.next().unwrap_or_else(|| data.join("sample.flac"));
    let video = args.next().unwrap_or_else(|| data.join("sample.gif"));
    let tokenizer = args.next().unwrap_or_else(|| data.join("tokenizer"));

    let text = TextProcessor::from_pretrained(&tokenizer, TextProcessorConfig::default())?;
    let batch = text.encode(&["a red house on a hill", "a rising whistle"])?;
    println!("text   input_ids {:?}", batch.input_ids.shape());

    let images = ImageProcessor::new(ImageProcessorConfig::clip())?;
    let pixels = images.process(&[ImageInput::Source(Source::Path(image))])?;
    println!("image  pixel_values {:?}", pixels.shape());

    let sounds = AudioProcessor::new(AudioProcessorConfig::whisper())?;
    let feats = sounds.process(&[AudioInput::Source(Source::Path(audio))])?;
    println!(
        "audio  input_features {:?}, chunks {:?}",
        feats.input_features.shape(),
        feats.num_chunks
    );

    let videos = VideoProcessor::new(VideoProcessorConfig::default(), images)?;
    let clips = videos.process(&[VideoInput::Source(Source::Path(video))])?;
    println!(
        "video  pixel_values {:?}, frames {:?}",
        clips.pixel_values.shape(),
        clips.indices[0]
    );
    Ok(())
}

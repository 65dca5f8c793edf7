//! Content keys of raw inputs: files by their bytes (read once, then handed to the
//! processor as bytes), arrays by dtype, shape and data, texts by their UTF-8.

use std::path::Path;

use crate::cache::{ContentKey, Fingerprint};
use crate::encoders::RawInputs;
use crate::error::{MlmfError, Result};
use crate::modality::Modality;
use crate::preprocess::audio::AudioInput;
use crate::preprocess::image::ImageInput;
use crate::preprocess::video::frames::list_frame_files;
use crate::preprocess::video::VideoInput;
use crate::preprocess::Source;

/// What a key is computed under: the modality, the model and the settings.
pub(crate) struct KeySpace<'a> {
    pub modality: Modality,
    pub model_id: &'a str,
    pub fingerprint: &'a Fingerprint,
}

impl KeySpace<'_> {
    fn parts(&self, parts: &[&[u8]]) -> ContentKey {
        ContentKey::of_parts(self.modality, self.model_id, self.fingerprint, parts)
    }

    fn bytes(&self, bytes: &[u8]) -> ContentKey {
        ContentKey::of_bytes(self.modality, self.model_id, self.fingerprint, bytes)
    }

    /// The key of one item of given embeddings: its shape, values and mask.
    pub fn given(&self, shape: &[usize], values: &[u8], mask: &[u8]) -> ContentKey {
        self.parts(&[b"given", &shape_bytes(shape), values, mask])
    }

    pub fn id(&self, id: &str) -> ContentKey {
        ContentKey::of_id(self.modality, self.model_id, self.fingerprint, id)
    }
}

fn shape_bytes(shape: &[usize]) -> Vec<u8> {
    shape
        .iter()
        .flat_map(|&n| (n as u64).to_le_bytes())
        .collect()
}

fn read(modality: Modality, index: usize, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        MlmfError::input(modality, format!("cannot read {}: {e}", path.display())).at_index(index)
    })
}

/// A file's bytes in place of its path: read once for the key, decoded from memory.
fn load_source(modality: Modality, index: usize, src: &mut Source) -> Result<()> {
    if let Source::Path(p) = src {
        *src = Source::Bytes(read(modality, index, p)?);
    }
    Ok(())
}

fn source_key(space: &KeySpace<'_>, src: &Source) -> ContentKey {
    match src {
        Source::Bytes(b) => space.bytes(b),
        // Only directories of frames stay paths (see `key_video`).
        Source::Path(p) => space.parts(&[b"path", p.to_string_lossy().as_bytes()]),
    }
}

/// Keys of a frame directory: the name and bytes of every frame file the video
/// processor reads from it, in its order.
fn dir_key(space: &KeySpace<'_>, index: usize, dir: &Path) -> Result<ContentKey> {
    let files = list_frame_files(dir).map_err(|e| e.at_index(index))?;
    let mut h = blake3::Hasher::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let bytes = read(space.modality, index, f)?;
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(space.parts(&[b"frame-dir", h.finalize().as_bytes()]))
}

/// The content key of every item of `inputs`, reading files into memory on the way
/// (so that the processor decodes the bytes that were hashed).
pub(crate) fn content_keys(
    space: &KeySpace<'_>,
    inputs: &mut RawInputs,
) -> Result<Vec<ContentKey>> {
    let m = space.modality;
    match inputs {
        RawInputs::Text(texts) => Ok(texts.iter().map(|t| space.bytes(t.as_bytes())).collect()),
        RawInputs::Image(images) => images
            .iter_mut()
            .enumerate()
            .map(|(i, img)| match img {
                ImageInput::Source(src) => {
                    load_source(m, i, src)?;
                    Ok(source_key(space, src))
                }
                ImageInput::Array(a) => {
                    let a = a.as_standard_layout();
                    let data = a.as_slice().unwrap_or_default();
                    Ok(space.parts(&[b"u8", &shape_bytes(a.shape()), data]))
                }
            })
            .collect(),
        RawInputs::Audio(clips) => clips
            .iter_mut()
            .enumerate()
            .map(|(i, clip)| match clip {
                AudioInput::Source(src) => {
                    load_source(m, i, src)?;
                    Ok(source_key(space, src))
                }
                AudioInput::Samples {
                    data,
                    sampling_rate,
                } => {
                    let a = data.as_standard_layout();
                    let samples: &[f32] = a.as_slice().unwrap_or_default();
                    let rate = sampling_rate.map_or(0u64, u64::from).to_le_bytes();
                    Ok(space.parts(&[
                        b"f32",
                        &shape_bytes(a.shape()),
                        &rate,
                        bytemuck::cast_slice(samples),
                    ]))
                }
            })
            .collect(),
        RawInputs::Video(videos) => videos
            .iter_mut()
            .enumerate()
            .map(|(i, v)| match v {
                VideoInput::Source(Source::Path(p)) if p.is_dir() => dir_key(space, i, p),
                VideoInput::Source(src) => {
                    load_source(m, i, src)?;
                    Ok(source_key(space, src))
                }
                VideoInput::Frames { data, fps } => {
                    let a = data.as_standard_layout();
                    let fps = fps.unwrap_or(0.0).to_le_bytes();
                    Ok(space.parts(&[
                        b"frames",
                        &shape_bytes(a.shape()),
                        &fps,
                        a.as_slice().unwrap_or_default(),
                    ]))
                }
                VideoInput::Sparse {
                    data,
                    indices,
                    total,
                    fps,
                } => {
                    let a = data.as_standard_layout();
                    let fps = fps.unwrap_or(0.0).to_le_bytes();
                    Ok(space.parts(&[
                        b"sparse",
                        &shape_bytes(a.shape()),
                        &shape_bytes(indices),
                        &(*total as u64).to_le_bytes(),
                        &fps,
                        a.as_slice().unwrap_or_default(),
                    ]))
                }
            })
            .collect(),
    }
}

/// The number of items in `inputs`.
pub(crate) fn len(inputs: &RawInputs) -> usize {
    match inputs {
        RawInputs::Text(v) => v.len(),
        RawInputs::Image(v) => v.len(),
        RawInputs::Audio(v) => v.len(),
        RawInputs::Video(v) => v.len(),
    }
}

/// The modality `inputs` belong to.
pub(crate) fn modality(inputs: &RawInputs) -> Modality {
    match inputs {
        RawInputs::Text(_) => Modality::Text,
        RawInputs::Image(_) => Modality::Image,
        RawInputs::Audio(_) => Modality::Audio,
        RawInputs::Video(_) => Modality::Video,
    }
}

/// The items of `inputs` at `positions`, in that order.
pub(crate) fn select(inputs: &RawInputs, positions: &[usize]) -> RawInputs {
    fn pick<T: Clone>(v: &[T], positions: &[usize]) -> Vec<T> {
        positions.iter().map(|&i| v[i].clone()).collect()
    }
    match inputs {
        RawInputs::Text(v) => RawInputs::Text(pick(v, positions)),
        RawInputs::Image(v) => RawInputs::Image(pick(v, positions)),
        RawInputs::Audio(v) => RawInputs::Audio(pick(v, positions)),
        RawInputs::Video(v) => RawInputs::Video(pick(v, positions)),
    }
}

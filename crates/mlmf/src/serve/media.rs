//! Request items to raw inputs: texts as strings; images, audio and video by value
//! (base64, a `data:` URL, or a multipart file), or by path only under a directory the
//! server allows. Every error names the modality, the item's index and what was
//! expected.

use std::path::{Path, PathBuf};

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::Value;

use super::error::ApiError;
use crate::encoders::RawInputs;
use crate::modality::Modality;
use crate::preprocess::audio::AudioInput;
use crate::preprocess::image::ImageInput;
use crate::preprocess::video::VideoInput;
use crate::preprocess::Source;

/// Standard base64, padded or not.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The one encoder of answers' base64 (padded standard).
pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn item_error(m: Modality, i: usize, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{m} input {i}: {message}"))
}

/// Decodes base64 or a `data:<type>;base64,<data>` URL.
pub(crate) fn decode_b64(m: Modality, i: usize, s: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => {
                return Err(item_error(
                    m,
                    i,
                    "a data URL must be `data:<type>;base64,<data>`",
                ))
            }
        },
        None => s,
    };
    if payload.is_empty() {
        return Err(item_error(
            m,
            i,
            "empty data: expected base64 of a media file",
        ));
    }
    B64.decode(payload.trim()).map_err(|e| {
        item_error(
            m,
            i,
            format!("not valid base64 ({e}): expected base64 of a media file"),
        )
    })
}

/// Resolves a requested path: it must lie under an allowed directory after links are
/// resolved.
fn allowed_path(m: Modality, i: usize, p: &str, allow: &[PathBuf]) -> Result<PathBuf, ApiError> {
    if allow.is_empty() {
        return Err(item_error(
            m,
            i,
            "paths are refused by this server (media only by value: send base64); \
             it must be started with --allow-path DIR to read files",
        ));
    }
    let resolved = Path::new(p).canonicalize().map_err(|_| {
        item_error(
            m,
            i,
            format!("no readable file at {p:?} under the allowed directories"),
        )
    })?;
    if !allow.iter().any(|d| resolved.starts_with(d)) || !resolved.is_file() {
        return Err(item_error(
            m,
            i,
            format!("{p:?} is not a file under the allowed directories"),
        ));
    }
    Ok(resolved)
}

/// One media item: a base64 string / data URL, `{"data": ...}` or `{"path": ...}`.
fn media_source(m: Modality, i: usize, v: &Value, allow: &[PathBuf]) -> Result<Source, ApiError> {
    match v {
        Value::String(s) => Ok(Source::Bytes(decode_b64(m, i, s)?)),
        Value::Object(o) => match (o.get("data"), o.get("path")) {
            (Some(Value::String(s)), None) => Ok(Source::Bytes(decode_b64(m, i, s)?)),
            (None, Some(Value::String(p))) => Ok(Source::Path(allowed_path(m, i, p, allow)?)),
            _ => Err(item_error(
                m,
                i,
                "expected {\"data\": \"<base64>\"} or {\"path\": \"<file>\"} (one of the two, a string)",
            )),
        },
        other => Err(item_error(
            m,
            i,
            format!("expected a base64 string or an object, got {}", kind_of(other)),
        )),
    }
}

/// JSON's name for a value's type, for messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Raw inputs of media modality `m` from sources (multipart files, JSON items).
pub(crate) fn from_sources(m: Modality, sources: Vec<Source>) -> Result<RawInputs, ApiError> {
    Ok(match m {
        Modality::Image => RawInputs::Image(sources.into_iter().map(ImageInput::Source).collect()),
        Modality::Audio => RawInputs::Audio(sources.into_iter().map(AudioInput::Source).collect()),
        Modality::Video => RawInputs::Video(sources.into_iter().map(VideoInput::Source).collect()),
        other => {
            return Err(ApiError::bad_request(format!(
                "{other} takes no media files: expected text, image, audio or video"
            )))
        }
    })
}

/// The items of modality `m` in a JSON array (a lone string counts as one item).
pub(crate) fn parse_items(
    m: Modality,
    v: &Value,
    allow: &[PathBuf],
) -> Result<RawInputs, ApiError> {
    let one;
    let list: &[Value] = match v {
        Value::Array(a) => a,
        Value::String(_) => {
            one = [v.clone()];
            &one
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "{m}: expected an array of items, got {}",
                kind_of(other)
            )))
        }
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{m}: empty list: expected at least one item"
        )));
    }
    if m == Modality::Text {
        let texts = list
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                Value::String(s) => Ok(s.clone()),
                other => Err(item_error(
                    m,
                    i,
                    format!("expected a string, got {}", kind_of(other)),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(RawInputs::Text(texts));
    }
    let sources = list
        .iter()
        .enumerate()
        .map(|(i, v)| media_source(m, i, v, allow))
        .collect::<Result<Vec<_>, _>>()?;
    from_sources(m, sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_forms_decode_and_bad_ones_name_the_item() {
        let m = Modality::Image;
        assert_eq!(decode_b64(m, 0, "aGk=").unwrap(), b"hi");
        assert_eq!(decode_b64(m, 0, "aGk").unwrap(), b"hi");
        assert_eq!(
            decode_b64(m, 0, "data:image/png;base64,aGk=").unwrap(),
            b"hi"
        );
        let e = decode_b64(m, 3, "%%%").unwrap_err();
        assert!(
            e.message.starts_with("image input 3: not valid base64"),
            "{}",
            e.message
        );
        let e = decode_b64(m, 1, "data:image/png,aGk=").unwrap_err();
        assert!(e.message.contains("data URL"), "{}", e.message);
        assert!(decode_b64(m, 0, "").is_err());
    }

    #[test]
    fn items_parse_and_paths_need_an_allowed_directory() {
        let dir = std::env::temp_dir().join(format!("mlmf-media-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.bin");
        std::fs::write(&file, b"x").unwrap();
        let allow = vec![dir.canonicalize().unwrap()];
        let p = file.to_string_lossy().to_string();

        let e = parse_items(Modality::Image, &json!([{"path": p}]), &[]).unwrap_err();
        assert!(e.message.contains("--allow-path"), "{}", e.message);
        let ok = parse_items(Modality::Image, &json!([{"path": p}, "aGk="]), &allow).unwrap();
        assert!(matches!(ok, RawInputs::Image(v) if v.len() == 2));
        // Outside the directory (after resolving `..`): refused.
        let outside = format!("{}/../{}", dir.display(), "x.bin");
        let e = parse_items(Modality::Image, &json!([{"path": outside}]), &allow).unwrap_err();
        assert!(e.message.starts_with("image input 0:"), "{}", e.message);

        let e = parse_items(Modality::Text, &json!(["a", 3]), &[]).unwrap_err();
        assert_eq!(e.message, "text input 1: expected a string, got a number");
        let e = parse_items(Modality::Audio, &json!([]), &[]).unwrap_err();
        assert!(e.message.contains("empty list"), "{}", e.message);
        let e = parse_items(Modality::Video, &json!({"x": 1}), &[]).unwrap_err();
        assert!(e.message.contains("expected an array"), "{}", e.message);
        let e = parse_items(
            Modality::Image,
            &json!([{"data": "aGk=", "path": p}]),
            &allow,
        )
        .unwrap_err();
        assert!(e.message.contains("one of the two"), "{}", e.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

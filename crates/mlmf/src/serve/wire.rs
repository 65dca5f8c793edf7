//! The JSON the server reads and writes: request bodies as checked JSON objects, and
//! float arrays as nested lists (float32's shortest decimal, so a float32 cast gives
//! back the exact value) or, with `encoding_format: "base64"`, as
//! `{"shape", "dtype": "float32", "data": <little-endian bytes in base64>}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use candle_core::{DType, Tensor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::error::ApiError;
use super::media::{b64_encode, kind_of};
use crate::encoders::layers::ce;

/// How float arrays are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Float,
    Base64,
}

impl Format {
    /// `encoding_format`: `float` (default) or `base64`.
    pub(crate) fn parse(obj: &Map<String, Value>) -> Result<Self, ApiError> {
        match obj.get("encoding_format") {
            None | Some(Value::Null) => Ok(Self::Float),
            Some(Value::String(s)) if s == "float" => Ok(Self::Float),
            Some(Value::String(s)) if s == "base64" => Ok(Self::Base64),
            Some(other) => Err(ApiError::bad_request(format!(
                "`encoding_format`: expected \"float\" or \"base64\", got {other}"
            ))),
        }
    }
}

/// A float32 array with its shape, written in a [`Format`].
#[derive(Debug, Clone)]
pub(crate) struct Array {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f32>,
    pub(crate) format: Format,
}

impl Array {
    pub(crate) fn new(shape: Vec<usize>, data: Vec<f32>, format: Format) -> Self {
        Self {
            shape,
            data,
            format,
        }
    }

    /// A tensor's values (any float dtype, any device) as float32.
    pub(crate) fn of(t: &Tensor, format: Format) -> Result<Self, ApiError> {
        let data = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(ce("answer"))
            .map_err(ApiError::from)?;
        Ok(Self::new(t.dims().to_vec(), data, format))
    }
}

/// Nested lists of `data` with `shape`.
struct Nested<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.shape {
            [] => s.serialize_f32(self.data.first().copied().unwrap_or(0.0)),
            [n] => {
                let mut seq = s.serialize_seq(Some(*n))?;
                for v in &self.data[..*n] {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            [n, rest @ ..] => {
                let step: usize = rest.iter().product();
                let mut seq = s.serialize_seq(Some(*n))?;
                for i in 0..*n {
                    seq.serialize_element(&Nested {
                        shape: rest,
                        data: &self.data[i * step..(i + 1) * step],
                    })?;
                }
                seq.end()
            }
        }
    }
}

impl Serialize for Array {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.format {
            Format::Float => Nested {
                shape: &self.shape,
                data: &self.data,
            }
            .serialize(s),
            Format::Base64 => {
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("shape", &self.shape)?;
                m.serialize_entry("dtype", "float32")?;
                m.serialize_entry("data", &f32_base64(&self.data))?;
                m.end()
            }
        }
    }
}

/// Little-endian float32 bytes in base64 (OpenAI's `encoding_format: "base64"`).
pub(crate) fn f32_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    b64_encode(&bytes)
}

/// The request body as a JSON object; a body over the limit is 413, anything but a
/// JSON object 400.
pub(crate) fn json_object(
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(rejection)?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("empty body: expected a JSON object"));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(ApiError::bad_request(format!(
            "expected a JSON object, got {}",
            kind_of(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!("invalid JSON: {e}"))),
    }
}

/// The body as a JSON object with no keys outside `allowed`.
pub(crate) fn request(
    body: Result<Bytes, BytesRejection>,
    allowed: &[&str],
) -> Result<Map<String, Value>, ApiError> {
    let obj = json_object(body)?;
    only_keys(&obj, allowed)?;
    Ok(obj)
}

/// A body that could not be read: too large (413) or broken off (400).
pub(crate) fn rejection(r: BytesRejection) -> ApiError {
    let status = r.status();
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "payload_too_large", r.body_text())
    } else {
        ApiError::bad_request(format!("cannot read the body: {}", r.body_text()))
    }
}

/// Refuses keys outside `allowed`, so a misspelt field is an error, not ignored.
pub(crate) fn only_keys(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(format!(
            "unknown field `{k}`: expected one of {}",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

/// An optional boolean field.
pub(crate) fn flag(obj: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::bad_request(format!(
            "`{key}`: expected true or false, got {}",
            kind_of(other)
        ))),
    }
}

/// An optional string field.
pub(crate) fn string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(format!(
            "`{key}`: expected a string, got {}",
            kind_of(other)
        ))),
    }
}

/// A JSON answer.
pub(crate) fn json<T: Serialize>(v: &T) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let body = serde_json::to_vec(v).map_err(|e| ApiError::internal(format!("answer: {e}")))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_serialise_nested_or_as_base64() {
        let a = Array::new(
            vec![2, 3],
            vec![0.1, 2.0, -3.5, 4.0, 5.0, 1e-8],
            Format::Float,
        );
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            "[[0.1,2.0,-3.5],[4.0,5.0,1e-8]]"
        );
        let b = Array::new(vec![2], vec![1.0, -2.0], Format::Base64);
        let v: Value = serde_json::to_value(&b).unwrap();
        assert_eq!(v["shape"], serde_json::json!([2]));
        assert_eq!(v["dtype"], "float32");
        // 1.0f32 = 00 00 80 3f, -2.0f32 = 00 00 00 c0 (little-endian).
        assert_eq!(v["data"], b64_encode(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]));
        let e = Array::new(vec![0, 4], vec![], Format::Float);
        assert_eq!(serde_json::to_string(&e).unwrap(), "[]");
    }

    #[test]
    fn bodies_must_be_json_objects() {
        let ok = json_object(Ok(Bytes::from_static(b"{\"a\": 1}"))).unwrap();
        assert_eq!(ok["a"], 1);
        for (body, want) in [
            (&b""[..], "empty body"),
            (b"[1]", "got an array"),
            (b"{\"a\": ", "invalid JSON"),
        ] {
            let e = json_object(Ok(Bytes::from_static(body))).unwrap_err();
            assert!(e.message.contains(want), "{}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        let mut o = Map::new();
        o.insert("tetx".into(), Value::Null);
        let e = only_keys(&o, &["text"]).unwrap_err();
        assert!(
            e.message.starts_with("unknown field `tetx`"),
            "{}",
            e.message
        );
    }
}

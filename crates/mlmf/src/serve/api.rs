//! The model endpoints: `/v1/embeddings` (OpenAI's shape), `/v1/infer`,
//! `/v1/similarity` and `/v1/zero-shot`. Each parses and checks its request, encodes
//! every modality's items through the batchers (concurrently), and finishes on a
//! blocking thread: fusion, attention and the aligned heads are the same calls
//! `MultiModalModel` makes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::task::JoinSet;

use super::error::ApiError;
use super::media::{self, kind_of};
use super::routes::AppState;
use super::wire::{self, Array, Format};
use crate::aligned;
use crate::encoders::RawInputs;
use crate::modality::Modality;
use crate::model::{keys, zero_shot_from, MultiModalInput, PreEncoded};
use crate::preprocess::Source;

type Shared = State<Arc<AppState>>;

/// The four modalities a request can carry raw items of.
const MEDIA: [Modality; 4] = Modality::BUILTIN;

/// Tokens per text (for text's batch budget and `usage`); the item count elsewhere.
fn costs(st: &AppState, items: &RawInputs) -> Result<(usize, usize), ApiError> {
    match items {
        RawInputs::Text(t) => {
            let enc = st.model.encoder(Modality::Text)?;
            let n: usize = enc.count_tokens(t)?.map_or(t.len(), |c| c.iter().sum());
            Ok((n.max(1), n))
        }
        other => Ok((keys::len(other), 0)),
    }
}

/// Encodes each modality's items through its queue, all modalities at once.
async fn encode_all(
    st: &Arc<AppState>,
    inputs: Vec<RawInputs>,
) -> Result<(BTreeMap<Modality, PreEncoded>, usize), ApiError> {
    let mut set = JoinSet::new();
    let mut tokens = 0;
    for items in inputs {
        // Tokenising a large request takes milliseconds: off the HTTP thread's other
        // tasks while it runs.
        let (cost, t) = tokio::task::block_in_place(|| costs(st, &items))?;
        tokens += t;
        let st = st.clone();
        set.spawn(async move {
            let m = keys::modality(&items);
            (m, st.batchers.encode(items, cost).await)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        let (m, r) = r.map_err(|e| ApiError::internal(format!("encoding task failed: {e}")))?;
        out.insert(m, r?);
    }
    Ok((out, tokens))
}

/// Runs `f` on a blocking thread (fusion, heads: CPU work), panics caught.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || crate::error::catch_panic(what, f))
        .await
        .map_err(|e| ApiError::internal(format!("{what}: {e}")))?
        .map_err(ApiError::from)
}

fn pooled_rows(p: &PreEncoded, format: Format) -> Result<Vec<Array>, ApiError> {
    p.items
        .iter()
        .map(|e| Array::of(&e.pooled, format))
        .collect()
}

// ---------------------------------------------------------------------------------
// POST /v1/embeddings

#[derive(Serialize)]
struct EmbeddingRow {
    object: &'static str,
    index: usize,
    embedding: Embedding,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingRow>,
    model: String,
    usage: Usage,
}

/// Which modality an embeddings request embeds: `modality` when given, else the
/// modality `model` names (a modality name, or the checkpoint folder of one), else
/// text. A `model` the server does not serve is an error naming the ones it does.
fn embeddings_modality(st: &AppState, obj: &Map<String, Value>) -> Result<Modality, ApiError> {
    let named = wire::string(obj, "model")?;
    let explicit = wire::string(obj, "modality")?
        .map(|s| {
            s.parse::<Modality>()
                .ok()
                .filter(|m| MEDIA.contains(m))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`modality`: unknown modality {s:?}: expected text, image, audio or video"
                    ))
                })
        })
        .transpose()?;
    let by_model = match named {
        None => None,
        Some(name) => Some(st.model_for(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "model {name:?} is not served here: expected one of {}",
                st.model_names().join(", ")
            ))
        })?),
    };
    Ok(explicit.or(by_model.flatten()).unwrap_or(Modality::Text))
}

/// OpenAI's embeddings: `input` a string or a list (texts; base64 media with
/// `modality`), `encoding_format`, `dimensions`.
pub(crate) async fn embeddings(
    State(st): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let obj = wire::request(body, &EMBEDDINGS_KEYS)?;
    let m = embeddings_modality(&st, &obj)?;
    let format = Format::parse(&obj)?;
    let input = obj
        .get("input")
        .ok_or_else(|| ApiError::bad_request("`input` is required: a string or a list of them"))?;
    if let Value::Array(a) = input {
        if a.first().is_some_and(|v| v.is_number() || v.is_array()) {
            return Err(ApiError::bad_request(
                "`input`: token id arrays are not accepted: send the texts",
            ));
        }
    }
    let items = media::parse_items(m, input, &st.settings.allow_paths)?;
    let width = st.model.widths(m)?.0;
    let dims = match obj.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(d) if d >= 1 && d as usize <= width => Some(d as usize),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`dimensions`: expected a whole number in 1..={width} (this {m} model's width), got {n}"
                )))
            }
        },
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`dimensions`: expected a number, got {}",
                kind_of(other)
            )))
        }
    };
    let (mut pre, tokens) = encode_all(&st, vec![items]).await?;
    let p = pre
        .remove(&m)
        .ok_or_else(|| ApiError::internal("no encodings came back"))?;
    let data = pooled_rows(&p, Format::Float)?
        .into_iter()
        .enumerate()
        .map(|(index, a)| {
            let mut v = a.data;
            if let Some(d) = dims {
                v.truncate(d);
                let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
                if norm > 0.0 {
                    v.iter_mut()
                        .for_each(|x| *x = (f64::from(*x) / norm) as f32);
                }
            }
            EmbeddingRow {
                object: "embedding",
                index,
                embedding: match format {
                    Format::Float => Embedding::Float(v),
                    Format::Base64 => Embedding::Base64(wire::f32_base64(&v)),
                },
            }
        })
        .collect();
    let model = wire::string(&obj, "model")?
        .map(str::to_string)
        .unwrap_or_else(|| st.settings.model_name.clone());
    wire::json(&EmbeddingList {
        object: "list",
        data,
        model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
}

// ---------------------------------------------------------------------------------
// POST /v1/infer

/// A parsed infer request.
struct InferRequest {
    inputs: Vec<RawInputs>,
    return_attention: bool,
    return_tokens: bool,
    format: Format,
}

const EMBEDDINGS_KEYS: [&str; 6] = [
    "model",
    "input",
    "encoding_format",
    "dimensions",
    "user",
    "modality",
];
const SIMILARITY_KEYS: [&str; 5] = ["text", "image", "audio", "video", "encoding_format"];
const ZERO_SHOT_KEYS: [&str; 6] = [
    "image",
    "audio",
    "video",
    "labels",
    "template",
    "encoding_format",
];
const INFER_KEYS: [&str; 7] = [
    "text",
    "image",
    "audio",
    "video",
    "return_attention",
    "return_tokens",
    "encoding_format",
];

/// Modality items from a JSON object's `text` / `image` / `audio` / `video` fields.
fn items_of(st: &AppState, obj: &Map<String, Value>) -> Result<Vec<RawInputs>, ApiError> {
    MEDIA
        .iter()
        .filter_map(|m| obj.get(&m.to_string()).map(|v| (*m, v)))
        .map(|(m, v)| media::parse_items(m, v, &st.settings.allow_paths))
        .collect()
}

fn infer_options(
    obj: &Map<String, Value>,
    inputs: Vec<RawInputs>,
) -> Result<InferRequest, ApiError> {
    Ok(InferRequest {
        inputs,
        return_attention: wire::flag(obj, "return_attention")?,
        return_tokens: wire::flag(obj, "return_tokens")?,
        format: Format::parse(obj)?,
    })
}

/// A multipart infer request: `text` fields and `image` / `audio` / `video` files, in
/// order per modality, plus an optional `options` field holding the JSON flags.
async fn multipart_request(mut mp: Multipart) -> Result<InferRequest, ApiError> {
    let mut texts = Vec::new();
    let mut files: BTreeMap<Modality, Vec<Source>> = BTreeMap::new();
    let mut options = Map::new();
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(
            e.status(),
            if e.status().as_u16() == 413 {
                "payload_too_large"
            } else {
                "invalid_request_error"
            },
            format!("multipart body: {}", e.body_text()),
        )
    };
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "text" => texts.push(field.text().await.map_err(bad)?),
            "options" => {
                let raw = field.bytes().await.map_err(bad)?;
                options = wire::request(Ok(raw), &INFER_KEYS[4..])?;
            }
            other => {
                let m = other
                    .parse::<Modality>()
                    .ok()
                    .filter(|m| MEDIA[1..].contains(m))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "unknown multipart field {other:?}: expected text, image, audio, video or options"
                        ))
                    })?;
                let bytes = field.bytes().await.map_err(bad)?;
                let list = files.entry(m).or_default();
                if bytes.is_empty() {
                    return Err(ApiError::bad_request(format!(
                        "{m} input {}: empty file",
                        list.len()
                    )));
                }
                list.push(Source::Bytes(bytes.to_vec()));
            }
        }
    }
    let mut inputs = Vec::new();
    if !texts.is_empty() {
        inputs.push(RawInputs::Text(texts));
    }
    for (m, sources) in files {
        inputs.push(media::from_sources(m, sources)?);
    }
    infer_options(&options, inputs)
}

#[derive(Serialize)]
struct TokensOut {
    hidden_states: Array,
    mask: Vec<Vec<u8>>,
}

#[derive(Serialize)]
struct SimilarityOut {
    other: String,
    logits_per_text: Array,
}

#[derive(Serialize)]
struct InferOut {
    object: &'static str,
    embeddings: BTreeMap<String, Array>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    projected: BTreeMap<String, Array>,
    fused: Array,
    gates: Option<BTreeMap<String, Array>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attention: BTreeMap<String, Array>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tokens: BTreeMap<String, TokensOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<SimilarityOut>,
    skipped: Vec<String>,
    stats: Value,
}

/// The multimodal call: JSON (`{"text": [...], "image": [base64, ...], ...}`) or
/// multipart; the answer holds what `MultiModalModel.infer` returns.
pub(crate) async fn infer(State(st): Shared, req: Request) -> Result<Response, ApiError> {
    let multipart = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let r = if multipart {
        let mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart body: {}", e.body_text())))?;
        multipart_request(mp).await?
    } else {
        let body = Bytes::from_request(req, &()).await;
        let obj = wire::request(body, &INFER_KEYS)?;
        let inputs = items_of(&st, &obj)?;
        infer_options(&obj, inputs)?
    };
    if r.inputs.is_empty() {
        return Err(ApiError::bad_request(format!(
            "no inputs: expected at least one of text, image, audio, video (this model takes {})",
            st.model
                .modalities()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // The model checks the call's shape (modalities it has, equal batch sizes) before
    // any encoding.
    for items in &r.inputs {
        st.model.widths(keys::modality(items))?;
    }
    let sizes: Vec<(Modality, usize)> = r
        .inputs
        .iter()
        .map(|i| (keys::modality(i), keys::len(i)))
        .collect();
    if let Some((m, n)) = sizes.iter().find(|(_, n)| *n != sizes[0].1) {
        return Err(ApiError::bad_request(format!(
            "{m}: {n} items, but {} has {}: every modality carries one item per row",
            sizes[0].0, sizes[0].1
        )));
    }
    let (pre, _) = encode_all(&st, r.inputs).await?;
    let model = st.model.clone();
    let input = MultiModalInput {
        return_attention: r.return_attention,
        return_tokens: r.return_tokens,
        ..MultiModalInput::default()
    };
    let t = std::time::Instant::now();
    let out = blocking("inference", move || model.infer_encoded(input, pre)).await?;
    st.metrics.stage("fuse", "all", t.elapsed());
    let f = r.format;
    let map = |ts: &BTreeMap<Modality, candle_core::Tensor>| -> Result<BTreeMap<String, Array>, ApiError> {
        ts.iter().map(|(m, t)| Ok((m.to_string(), Array::of(t, f)?))).collect()
    };
    let gates = match &out.gates {
        Some(g) => Some(
            st.model
                .gate_columns(g)?
                .into_iter()
                .map(|(m, col)| (m.to_string(), Array::new(vec![col.len()], col, f)))
                .collect(),
        ),
        None => None,
    };
    let tokens = out
        .tokens
        .iter()
        .filter(|_| r.return_tokens)
        .map(|(m, t)| {
            let mask = t
                .mask
                .to_dtype(candle_core::DType::U8)
                .and_then(|x| x.to_vec2::<u8>())
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((
                m.to_string(),
                TokensOut {
                    hidden_states: Array::of(&t.hidden_states, f)?,
                    mask,
                },
            ))
        })
        .collect::<Result<_, ApiError>>()?;
    let similarity = out.similarity.as_ref().map(|s| SimilarityOut {
        other: s.other.to_string(),
        logits_per_text: array2(&s.logits_per_text, f),
    });
    wire::json(&InferOut {
        object: "infer",
        embeddings: map(&out.embeddings)?,
        projected: map(&out.projected)?,
        fused: Array::of(&out.fused, f)?,
        gates,
        attention: out
            .attention
            .iter()
            .map(|(n, t)| Ok((n.clone(), Array::of(t, f)?)))
            .collect::<Result<_, ApiError>>()?,
        tokens,
        similarity,
        skipped: out.skipped.iter().map(ToString::to_string).collect(),
        stats: serde_json::to_value(&out.stats).unwrap_or(Value::Null),
    })
}

fn array2(a: &ndarray::Array2<f32>, f: Format) -> Array {
    Array::new(a.shape().to_vec(), a.iter().copied().collect(), f)
}

// ---------------------------------------------------------------------------------
// POST /v1/similarity and /v1/zero-shot

/// The one non-text modality of an aligned request and its items.
fn other_items(st: &AppState, obj: &Map<String, Value>) -> Result<RawInputs, ApiError> {
    let mut others: Vec<RawInputs> = items_of(st, obj)?
        .into_iter()
        .filter(|i| keys::modality(i) != Modality::Text)
        .collect();
    match others.len() {
        1 => Ok(others.remove(0)),
        0 => Err(ApiError::bad_request(
            "expected the items to compare with the texts: image, audio or video",
        )),
        _ => Err(ApiError::bad_request(
            "expected one of image, audio or video, not several",
        )),
    }
}

#[derive(Serialize)]
struct SimilarityAnswer {
    object: &'static str,
    other: String,
    logits_per_text: Array,
    #[serde(flatten)]
    per_other: BTreeMap<String, Array>,
}

/// `logits_per_text` (and `logits_per_<other>`) of texts against one other modality,
/// from the checkpoint's own heads.
pub(crate) async fn similarity(
    State(st): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let obj = wire::request(body, &SIMILARITY_KEYS)?;
    let f = Format::parse(&obj)?;
    let texts = obj
        .get("text")
        .ok_or_else(|| ApiError::bad_request("`text` is required: the texts to compare"))?;
    let texts = media::parse_items(Modality::Text, texts, &[])?;
    let other = other_items(&st, &obj)?;
    let m = keys::modality(&other);
    st.model.aligned_head(m)?;
    let (mut pre, _) = encode_all(&st, vec![texts, other]).await?;
    let (t, o) = (take(&mut pre, Modality::Text)?, take(&mut pre, m)?);
    let model = st.model.clone();
    let tm = std::time::Instant::now();
    let sim = blocking("similarity", move || {
        model.similarity_encoded(&t.items, m, &o.items)
    })
    .await?;
    st.metrics.stage("similarity", &m.to_string(), tm.elapsed());
    let mut per_other = BTreeMap::new();
    per_other.insert(
        format!("logits_per_{m}"),
        array2(&sim.logits_per_other(), f),
    );
    wire::json(&SimilarityAnswer {
        object: "similarity",
        other: m.to_string(),
        logits_per_text: array2(&sim.logits_per_text, f),
        per_other,
    })
}

fn take(pre: &mut BTreeMap<Modality, PreEncoded>, m: Modality) -> Result<PreEncoded, ApiError> {
    pre.remove(&m)
        .ok_or_else(|| ApiError::internal(format!("no {m} encodings came back")))
}

#[derive(Serialize)]
struct ZeroShotAnswer {
    object: &'static str,
    other: String,
    labels: Vec<String>,
    prompts: Vec<String>,
    logits: Array,
    probs: Array,
    best: Vec<String>,
    best_index: Vec<usize>,
}

/// Each item classified among `labels` put into `template`.
pub(crate) async fn zero_shot(
    State(st): Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let obj = wire::request(body, &ZERO_SHOT_KEYS)?;
    let f = Format::parse(&obj)?;
    let labels: Vec<String> = match obj.get("labels") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad_request(format!(
                    "`labels` item {i}: expected a string, got {}",
                    kind_of(other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`labels`: expected a list of label texts, got {}",
                kind_of(other)
            )))
        }
        None => {
            return Err(ApiError::bad_request(
                "`labels` is required: a list of label texts",
            ))
        }
    };
    let other = other_items(&st, &obj)?;
    let m = keys::modality(&other);
    st.model.aligned_head(m)?;
    let template = wire::string(&obj, "template")?
        .unwrap_or_else(|| aligned::default_template(m))
        .to_string();
    let prompts = aligned::prompts(&labels, &template, m)?;
    let (mut pre, _) = encode_all(&st, vec![RawInputs::Text(prompts.clone()), other]).await?;
    let (t, o) = (take(&mut pre, Modality::Text)?, take(&mut pre, m)?);
    let model = st.model.clone();
    let sim = blocking("zero-shot", move || {
        model.similarity_encoded(&t.items, m, &o.items)
    })
    .await?;
    let z = zero_shot_from(sim, &labels, prompts);
    wire::json(&ZeroShotAnswer {
        object: "zero_shot",
        other: m.to_string(),
        best: z.best.iter().map(|&i| z.labels[i].clone()).collect(),
        best_index: z.best.clone(),
        logits: array2(&z.logits, f),
        probs: array2(&z.probs, f),
        labels: z.labels,
        prompts: z.prompts,
    })
}

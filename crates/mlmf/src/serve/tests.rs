//! Unit tests of the server's parts; the whole server is tested from Python
//! (tests/test_serve.py) against a real socket.

use std::collections::BTreeSet;

use axum::http::StatusCode;

use super::error::ApiError;
use super::routes::OPENAPI;
use super::ServeSettings;
use crate::error::MlmfError;
use crate::modality::Modality;

#[test]
fn the_openapi_description_lists_every_route() {
    let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let paths: BTreeSet<&str> = v["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let routes: BTreeSet<&str> = super::routes::ROUTES.iter().copied().collect();
    assert_eq!(paths, routes);
    assert!(v["openapi"].as_str().unwrap().starts_with("3.1"));
}

#[test]
fn errors_map_to_the_side_at_fault() {
    let bad = ApiError::from(MlmfError::input(Modality::Image, "no").at_index(2));
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.message, "image input 2: no");
    let missing = ApiError::from(MlmfError::MissingModality {
        modality: Modality::Text,
        message: "none".into(),
    });
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let ours = ApiError::from(MlmfError::Internal("bug".into()));
    assert_eq!(ours.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(ours.kind, "server_error");
    let full = ApiError::overloaded(4);
    assert_eq!((full.status.as_u16(), full.retry_after), (429, Some(1)));
}

#[test]
fn settings_are_checked() {
    let ok = ServeSettings::default();
    assert_eq!(ok.host, "127.0.0.1");
    ok.clone().validate().unwrap();
    let cases: Vec<(ServeSettings, &str)> = vec![
        (
            ServeSettings {
                max_batch_items: 0,
                ..ok.clone()
            },
            "serve.max_batch_items",
        ),
        (
            ServeSettings {
                host: " ".into(),
                ..ok.clone()
            },
            "serve.host",
        ),
        (
            ServeSettings {
                api_key: Some("a b".into()),
                ..ok.clone()
            },
            "serve.api_key",
        ),
        (
            ServeSettings {
                max_wait: std::time::Duration::from_secs(11),
                ..ok.clone()
            },
            "serve.max_wait",
        ),
        (
            ServeSettings {
                allow_paths: vec!["/no/such/dir".into()],
                ..ok.clone()
            },
            "serve.allow_paths",
        ),
    ];
    for (mut s, path) in cases {
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains(path), "{e}");
    }
}

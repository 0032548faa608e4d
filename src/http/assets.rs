//! Static assets, embedded in the binary so one file runs anywhere: the
//! demo page at `/`, the widget (`/widget.js`), the client SDK
//! (`/sdk/spillway.js` and its types) and the iframe page (`/embed`).
//!
//! The scripts are public and run on other sites' pages (the widget loads
//! the SDK with `import()`, a CORS fetch), so they carry
//! `Access-Control-Allow-Origin: *`, an ETag and a short cache lifetime.
//! The embed page may be framed only by its widget's allowed origins
//! (`frame-ancestors`).

use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::Gateway;

const WIDGET_JS: &str = include_str!("../../static/widget.js");
const SDK_JS: &str = include_str!("../../static/sdk/spillway.js");
const SDK_DTS: &str = include_str!("../../static/sdk/spillway.d.ts");
const EMBED_HTML: &str = include_str!("../../static/embed.html");

/// `GET /`: the demo page.
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../../static/index.html"))
}

/// One embedded script with its validator, computed once.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: OnceLock<HeaderValue>,
}

static WIDGET: Asset = Asset::new(WIDGET_JS, "text/javascript; charset=utf-8");
static SDK: Asset = Asset::new(SDK_JS, "text/javascript; charset=utf-8");
static SDK_TYPES: Asset = Asset::new(SDK_DTS, "text/plain; charset=utf-8");

impl Asset {
    const fn new(body: &'static str, content_type: &'static str) -> Self {
        Self {
            body,
            content_type,
            etag: OnceLock::new(),
        }
    }

    fn etag(&self) -> &HeaderValue {
        self.etag.get_or_init(|| {
            let digest = Sha256::digest(self.body.as_bytes());
            let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\""))
                .unwrap_or(HeaderValue::from_static("\"0\""))
        })
    }

    /// The asset, or 304 when the client holds this version.
    fn respond(&self, request: &HeaderMap) -> Response {
        let etag = self.etag();
        let fresh = request
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim() == etag.to_str().unwrap_or(""))
            });
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            ([(header::CONTENT_TYPE, self.content_type)], self.body).into_response()
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, etag.clone());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        response
    }
}

/// `GET /widget.js`
pub async fn widget_js(headers: HeaderMap) -> Response {
    WIDGET.respond(&headers)
}

/// `GET /sdk/spillway.js`
pub async fn sdk_js(headers: HeaderMap) -> Response {
    SDK.respond(&headers)
}

/// `GET /sdk/spillway.d.ts`
pub async fn sdk_types(headers: HeaderMap) -> Response {
    SDK_TYPES.respond(&headers)
}

#[derive(Debug, Deserialize)]
pub struct EmbedQuery {
    /// The widget's public key.
    key: Option<String>,
}

/// `GET /embed?key=pk_…`: the chat as a page for an iframe, frameable only
/// by the widget's allowed origins. An unknown key: 404, never frameable.
pub async fn embed(
    State(gateway): State<Arc<Gateway>>,
    query: Result<Query<EmbedQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let key = query.ok().and_then(|q| q.0.key).unwrap_or_default();
    let ancestors = gateway.auth.widget_origins(&key).map(|origins| {
        if origins.iter().any(|o| o == "*") {
            "*".to_owned()
        } else {
            // Origins are validated at config load (scheme://host[:port]);
            // anything else would not survive as a header value.
            origins
                .iter()
                .filter(|o| o.bytes().all(|b| b.is_ascii_graphic()))
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        }
    });
    let (status, body, ancestors) = match ancestors {
        Some(list) if !list.is_empty() => (StatusCode::OK, EMBED_HTML, list),
        _ => (
            StatusCode::NOT_FOUND,
            "<!doctype html><meta charset=\"utf-8\"><title>Unknown widget</title><p>This widget key is unknown.</p>",
            "'none'".to_owned(),
        ),
    };
    let policy = format!(
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors {ancestors}"
    );
    let mut response = (status, Html(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&policy) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

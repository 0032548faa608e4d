//! Static assets, embedded in the binary so one file runs anywhere. Today:
//! the demo page at `/` (the widget replaces its body later).

use axum::response::Html;

/// `GET /`: the demo page.
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../../static/index.html"))
}

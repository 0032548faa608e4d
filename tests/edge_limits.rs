//! The edge's own bounds over real sockets: a client that never finishes
//! its headers (slowloris) is cut off while others are served; oversized
//! headers get 431, an overlong URL 414, a stalled body 408.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn gateway() -> TestGateway {
    let mut config = test_config("[server]\nlisten = \"127.0.0.1:0\"\n");
    config.server.header_timeout_secs = 1;
    config.server.body_timeout_secs = 1;
    TestGateway::start_with(config).await
}

/// Reads until the server closes the connection (or 15 s pass); returns
/// what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let gateway = gateway().await;
    let mut slow = TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: spillway\r\nX-Slow: 1")
        .await
        .unwrap();
    // Meanwhile, everyone else is served.
    let response = client().get(gateway.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer = read_to_close(&mut slow)
        .await
        .expect("the server closes a connection whose headers never end");
    assert!(!answer.contains("200 OK"), "{answer}");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let gateway = gateway().await;
    let response = client()
        .get(gateway.url("/healthz"))
        .header("x-big", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let mut request = client().get(gateway.url("/healthz"));
    for i in 0..120 {
        request = request.header(format!("x-h{i}"), "1");
    }
    assert_eq!(request.send().await.unwrap().status(), 431);
}

#[tokio::test]
async fn an_overlong_url_gets_a_typed_414() {
    let gateway = gateway().await;
    let response = client()
        .get(gateway.url(&format!("/v1/models?q={}", "a".repeat(9000))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 414);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "url_too_long", "{body}");
    // Just under the limit is fine.
    let response = client()
        .get(gateway.url(&format!("/v1/models?q={}", "a".repeat(8000))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let gateway = gateway().await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: spillway\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut stream)
        .await
        .expect("the server answers and closes");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

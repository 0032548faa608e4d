//! WHATWG conformance of the upstream SSE decoder
//! (`spillway::provider::sse::SseDecoder`) against the recorded fixtures in
//! `tests/fixtures/providers/`.
//!
//! The expectations come from `MANIFEST.json`, computed by the reference
//! parser `tests/fixtures/whatwg_sse.py` (and, for `sse-conformance/*`,
//! cross-checked against a browser's native `EventSource`). Every file is
//! fed three ways (one read, one read per byte, 7-byte reads) and all three
//! must decode identically: line ends, BOMs, multi-byte characters and
//! `data:` prefixes split across reads must not change a thing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use spillway::provider::sse::{SseDecoder, SseError, SseEvent};

/// The production default of `upstream.max_event_bytes`.
const CAP: usize = 1024 * 1024;

/// Files whose final `last_event_id` deliberately differs from the
/// reference parser's; each has its own named test below.
const LAST_EVENT_ID_DEVIATIONS: &[&str] = &["sse-conformance/wpt-unterminated-final-event.sse"];

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers")
}

fn read_fixture(file: &str) -> Vec<u8> {
    let path = fixtures_dir().join(file);
    std::fs::read(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

fn manifest() -> Vec<Value> {
    let raw = read_fixture("MANIFEST.json");
    serde_json::from_slice(&raw)
        .unwrap_or_else(|err| panic!("MANIFEST.json is not a list of entries: {err}"))
}

fn manifest_entry(file: &str) -> Value {
    manifest()
        .into_iter()
        .find(|entry| entry["file"] == file)
        .unwrap_or_else(|| panic!("{file} is not in MANIFEST.json"))
}

/// How the body is split into reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    Whole,
    ByteByByte,
    Chunks7,
}

const FEEDS: [Feed; 3] = [Feed::Whole, Feed::ByteByByte, Feed::Chunks7];

fn split(bytes: &[u8], feed: Feed) -> Vec<Result<Bytes, io::Error>> {
    let size = match feed {
        Feed::Whole => bytes.len().max(1),
        Feed::ByteByByte => 1,
        Feed::Chunks7 => 7,
    };
    bytes
        .chunks(size)
        .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
        .collect()
}

fn body(bytes: &[u8], feed: Feed) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    futures_util::stream::iter(split(bytes, feed))
}

/// Everything the decoder produced for one body.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    events: Vec<SseEvent>,
    last_event_id: String,
    retry: Option<u64>,
}

/// Decodes `body` to its end; any decoding error fails the test.
async fn decode_ok<S>(body: S, cap: usize, what: &str) -> Decoded
where
    S: Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
{
    let mut decoder = SseDecoder::new(body, cap);
    let mut events = Vec::new();
    while let Some(item) = decoder.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(err) => panic!("{what}: unexpected decoding error: {err}"),
        }
    }
    Decoded {
        events,
        last_event_id: decoder.last_event_id().to_owned(),
        retry: decoder.retry(),
    }
}

/// Decodes `body` to its end, keeping the events before the first error
/// and the error. Asserts that nothing comes after an error.
async fn decode_until_error<S>(body: S, cap: usize) -> (Vec<SseEvent>, Option<SseError>)
where
    S: Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
{
    let mut decoder = SseDecoder::new(body, cap);
    let mut events = Vec::new();
    while let Some(item) = decoder.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(err) => {
                assert!(
                    decoder.next().await.is_none(),
                    "the decoder must end after an error"
                );
                return (events, Some(err));
            }
        }
    }
    (events, None)
}

fn event(event: &str, data: &str, last_event_id: &str) -> SseEvent {
    SseEvent {
        event: event.to_owned(),
        data: data.to_owned(),
        last_event_id: last_event_id.to_owned(),
    }
}

/// One entry of `whatwg_expected.events`.
#[derive(Debug, serde::Deserialize)]
struct ManifestEvent {
    event: String,
    data: String,
    #[serde(rename = "lastEventId")]
    last_event_id: String,
}

fn expected_events(list: &Value) -> Vec<SseEvent> {
    let list: Vec<ManifestEvent> = serde_json::from_value(list.clone())
        .unwrap_or_else(|err| panic!("whatwg_expected.events is malformed: {err}"));
    list.into_iter()
        .map(|e| SseEvent {
            event: e.event,
            data: e.data,
            last_event_id: e.last_event_id,
        })
        .collect()
}

#[tokio::test]
async fn every_manifest_sse_file_decodes_as_whatwg_expects_whole_bytewise_and_in_7_byte_reads() {
    let mut checked = 0;
    let mut with_event_lists = 0;
    for entry in manifest() {
        let Some(expected) = entry.get("whatwg_expected") else {
            continue;
        };
        let file = entry["file"].as_str().expect("file is a string");
        let bytes = read_fixture(file);
        assert_eq!(
            bytes.len() as u64,
            entry["bytes"].as_u64().expect("bytes is a number"),
            "{file}: fixture length differs from the manifest"
        );

        let whole = decode_ok(body(&bytes, Feed::Whole), CAP, file).await;
        for feed in FEEDS {
            let what = format!("{file} ({feed:?})");
            let decoded = decode_ok(body(&bytes, feed), CAP, &what).await;

            // (a) the exact events, where the manifest lists them.
            if let Some(list) = expected.get("events") {
                assert_eq!(decoded.events, expected_events(list), "{what}: events");
            }

            // (b) count and the set of event names, for every file.
            let count = expected["event_count"]
                .as_u64()
                .expect("event_count is a number");
            assert_eq!(decoded.events.len() as u64, count, "{what}: event count");
            let names: BTreeSet<&str> = decoded.events.iter().map(|e| e.event.as_str()).collect();
            let expected_names: BTreeSet<&str> = expected["event_names"]
                .as_array()
                .expect("event_names is a list")
                .iter()
                .map(|name| name.as_str().expect("event name is a string"))
                .collect();
            assert_eq!(names, expected_names, "{what}: event names");

            // (c) retry always; the final last event id except where we
            // document a deviation (tested by name below).
            let retry = expected["retry"].as_u64();
            assert_eq!(decoded.retry, retry, "{what}: retry");
            if !LAST_EVENT_ID_DEVIATIONS.contains(&file) {
                let id = expected["last_event_id"]
                    .as_str()
                    .expect("last_event_id is a string");
                assert_eq!(decoded.last_event_id, id, "{what}: final last_event_id");
            }

            // The split must not matter at all.
            assert_eq!(decoded, whole, "{what}: differs from the one-read decode");
        }
        checked += 1;
        if expected.get("events").is_some() {
            with_event_lists += 1;
        }
    }
    // 23 SSE files in the manifest (everything but the NDJSON one), 10 of
    // them conformance files with full event lists. Guards against a
    // manifest that silently stops matching.
    assert_eq!(checked, 33, "SSE files checked");
    assert_eq!(with_event_lists, 10, "files with event lists checked");
}

/// Our documented behaviour for a final block without its blank line: it is
/// discarded at EOF *with* its `id` and `retry` fields (`sse-stream` drops
/// the whole block), so the final last event id stays "" here.
///
/// The manifest says "test" because the reference script reports the
/// *last event ID buffer*, which the spec fills line by line. What the spec
/// makes observable (`MessageEvent.lastEventId`, the `Last-Event-ID` sent on
/// reconnection) is the *last event ID string*, copied from the buffer only
/// when a block is dispatched at its blank line, which never comes here;
/// hence the WPT note "id not applied". Either way we never reconnect to an
/// upstream with `Last-Event-ID`, and adapters judge completeness by the
/// finish reason. The `retry:1000` comes from the first, terminated block,
/// so it is applied (a `retry` inside the discarded block would be lost, a
/// real but harmless deviation: we do not reconnect either).
#[tokio::test]
async fn unterminated_final_block_is_discarded_with_its_id() {
    let file = "sse-conformance/wpt-unterminated-final-event.sse";
    let bytes = read_fixture(file);
    assert_eq!(bytes, b"retry:1000\ndata:test1\n\nid:test\ndata:test2");
    let reference = &manifest_entry(file)["whatwg_expected"];
    assert_eq!(reference["last_event_id"], "test");
    assert_eq!(reference["incomplete_tail_discarded"], true);

    for feed in FEEDS {
        let decoded = decode_ok(body(&bytes, feed), CAP, file).await;
        assert_eq!(
            decoded,
            Decoded {
                events: vec![event("message", "test1", "")],
                last_event_id: String::new(),
                retry: Some(1000),
            },
            "{feed:?}"
        );
    }
}

#[tokio::test]
async fn terminating_the_final_block_dispatches_it_with_its_id() {
    // The same bytes plus the missing blank line: now the block counts.
    let mut bytes = read_fixture("sse-conformance/wpt-unterminated-final-event.sse");
    bytes.extend_from_slice(b"\n\n");
    for feed in FEEDS {
        let decoded = decode_ok(body(&bytes, feed), CAP, "terminated").await;
        assert_eq!(
            decoded,
            Decoded {
                events: vec![
                    event("message", "test1", ""),
                    event("message", "test2", "test")
                ],
                last_event_id: "test".to_owned(),
                retry: Some(1000),
            },
            "{feed:?}"
        );
    }
}

#[tokio::test]
async fn anthropic_transcripts_without_final_blank_line_lose_message_stop() {
    for file in [
        "anthropic-text-basic.sse",
        "anthropic-tool-use.sse",
        "anthropic-refusal-stop-reason.sse",
    ] {
        let bytes = read_fixture(file);
        assert!(
            bytes.ends_with(b"{\"type\":\"message_stop\"}")
                || bytes.ends_with(b"{\"type\":\"message_stop\"}\n")
        );
        for feed in FEEDS {
            let decoded = decode_ok(body(&bytes, feed), CAP, file).await;
            let last = decoded.events.last().expect("events");
            assert_eq!(last.event, "message_delta", "{file} ({feed:?})");
            assert!(
                decoded.events.iter().all(|e| e.event != "message_stop"),
                "{file} ({feed:?})"
            );
        }
    }
}

#[tokio::test]
async fn event_larger_than_the_cap_fails_with_event_too_large() {
    let cap = 1024;
    let mut bytes = b"data: small\n\n".to_vec();
    bytes.extend_from_slice(b"data: ");
    bytes.extend(std::iter::repeat_n(b'x', 2 * cap));
    bytes.extend_from_slice(b"\n\ndata: never reached\n\n");

    for feed in FEEDS {
        let (events, err) = decode_until_error(body(&bytes, feed), cap).await;
        match err {
            Some(SseError::EventTooLarge { limit }) => assert_eq!(limit, cap, "{feed:?}"),
            other => panic!("{feed:?}: expected EventTooLarge, got {other:?}"),
        }
        assert!(
            events.iter().all(|e| e.data != "never reached"),
            "{feed:?}: nothing after the oversized event"
        );
        if feed != Feed::Whole {
            // Reads that end before the big event deliver what precedes it.
            assert_eq!(events, vec![event("message", "small", "")], "{feed:?}");
        }
    }
}

#[tokio::test]
async fn event_larger_than_the_cap_fails_even_when_unterminated() {
    // An upstream that streams one huge data line and never ends the block:
    // the decoder must give up once the cap is passed, not buffer to EOF.
    let cap = 1024;
    let mut reads = vec![Ok::<_, io::Error>(Bytes::from_static(b"data: "))];
    reads.extend((0..1000).map(|_| Ok(Bytes::from(vec![b'y'; 100]))));
    let endless = futures_util::stream::iter(reads);
    let (events, err) = decode_until_error(endless, cap).await;
    assert!(events.is_empty());
    assert!(
        matches!(err, Some(SseError::EventTooLarge { limit }) if limit == cap),
        "got {err:?}"
    );
}

#[tokio::test]
async fn events_within_the_cap_pass_however_many_share_one_read() {
    // The cap bounds one event, not one network read: a burst of small
    // events arriving in a single read larger than the cap is fine.
    let cap = 1024;
    let bytes = read_fixture("openai-chat-text-include-usage.sse");
    assert!(bytes.len() > 8 * cap);
    let largest = bytes
        .split(|&b| b == b'\n')
        .map(<[u8]>::len)
        .max()
        .expect("lines");
    assert!(largest < cap);
    for feed in FEEDS {
        let decoded = decode_ok(body(&bytes, feed), cap, &format!("small cap ({feed:?})")).await;
        assert_eq!(decoded.events.len(), 34, "{feed:?}");
    }
}

#[tokio::test]
async fn event_exactly_at_the_cap_passes() {
    // The block is "data: " + payload + "\n"; the blank line ending it is
    // not part of it.
    let cap = 1024;
    let payload = "z".repeat(cap - b"data: \n".len());
    let bytes = format!("data: {payload}\n\n").into_bytes();
    assert_eq!(bytes.len(), cap + 1);
    for feed in FEEDS {
        let decoded = decode_ok(body(&bytes, feed), cap, "at cap").await;
        assert_eq!(
            decoded.events,
            vec![event("message", &payload, "")],
            "{feed:?}"
        );
    }
}

#[tokio::test]
async fn body_error_surfaces_as_sse_body_error_after_the_events_before_it() {
    let reads: Vec<Result<Bytes, io::Error>> = vec![
        Ok(Bytes::from_static(b"data: one\n\ndata: tw")),
        Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer reset")),
        Ok(Bytes::from_static(b"o\n\n")),
    ];
    let (events, err) = decode_until_error(futures_util::stream::iter(reads), CAP).await;
    assert_eq!(events, vec![event("message", "one", "")]);
    match err {
        Some(SseError::Body(source)) => {
            let io = source
                .downcast_ref::<io::Error>()
                .expect("the body's own error is kept as the source");
            assert_eq!(io.kind(), io::ErrorKind::ConnectionReset);
            assert_eq!(io.to_string(), "peer reset");
        }
        other => panic!("expected SseError::Body, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_utf8_in_a_data_field_fails_with_invalid_utf8() {
    // A deliberate deviation: a browser would substitute U+FFFD, we fail the
    // event (the upstream is broken; relaying mojibake helps nobody).
    let bytes = b"data: ok\n\ndata: \xff\xfe\n\n".to_vec();
    for feed in FEEDS {
        let (events, err) = decode_until_error(body(&bytes, feed), CAP).await;
        assert_eq!(events, vec![event("message", "ok", "")], "{feed:?}");
        assert!(
            matches!(err, Some(SseError::InvalidUtf8)),
            "{feed:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn crlf_split_between_reads_is_one_line_end() {
    // CR at the end of one read, LF at the start of the next: one line end,
    // so no spurious blank line dispatches the block early.
    let reads: Vec<Result<Bytes, io::Error>> = vec![
        Ok(Bytes::from_static(b"event: add\r")),
        Ok(Bytes::from_static(b"\ndata: 1\r")),
        Ok(Bytes::from_static(b"\n\r")),
        Ok(Bytes::from_static(b"\n")),
    ];
    let decoded = decode_ok(futures_util::stream::iter(reads), CAP, "split crlf").await;
    assert_eq!(decoded.events, vec![event("add", "1", "")]);
}

#[tokio::test]
async fn cap_counts_the_raw_bytes_of_one_block_whatever_the_line_ends() {
    // Largest raw block (its field and comment lines with their line ends,
    // CRLF being two bytes; not the blank line that ends it), computed from
    // the files with a regex split on CRLF | CR | LF.
    let cases = [
        ("sse-conformance/crlf-cr-lf-mixed.sse", 28),
        ("sse-conformance/wpt-comments-mixed-eol.sse", 4145),
        ("sse-conformance/wpt-bom.sse", 10),
        ("sse-conformance/wpt-unterminated-final-event.sse", 22),
        ("gemini-sse-basic-crlf.sse", 376),
        ("openai-chat-text-include-usage.sse", 307),
        ("anthropic-thinking-signature-padded-json.sse", 630),
    ];
    for (file, largest) in cases {
        let bytes = read_fixture(file);
        let unbounded = decode_ok(body(&bytes, Feed::Whole), CAP, file).await;
        for feed in FEEDS {
            let what = format!("{file} ({feed:?}) cap {largest}");
            let at_cap = decode_ok(body(&bytes, feed), largest, &what).await;
            assert_eq!(at_cap, unbounded, "{what}");

            let (_, err) = decode_until_error(body(&bytes, feed), largest - 1).await;
            assert!(
                matches!(err, Some(SseError::EventTooLarge { limit }) if limit == largest - 1),
                "{file} ({feed:?}) cap {}: got {err:?}",
                largest - 1
            );
        }
    }
}

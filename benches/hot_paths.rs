//! Micro-benchmarks of the per-token hot paths, with criterion:
//!
//! ```sh
//! cargo bench --bench hot_paths
//! ```
//!
//! 1. **upstream SSE decode**: a recorded OpenAI stream (the fixture
//!    `openai-chat-text-include-usage.sse`), split into 64-byte chunks,
//!    through `provider::sse::SseDecoder` (line splitting, event assembly);
//! 2. **chunk translation**: each of its `data:` payloads through the
//!    OpenAI adapter's `StreamDecoder` (JSON → `ProviderEvent`);
//! 3. **coalescing**: 1,000 text events appended to a generation's log,
//!    then one subscriber read that coalesces them into frames;
//! 4. **frame encoding**: a `delta` frame to its JSON text.
//!
//! Figures go in `docs/performance.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench binary

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use spillway::generation::{Generation, ReplicaSpec};
use spillway::protocol::ServerFrame;
use spillway::provider::ProviderEvent;

fn fixture() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/providers/openai-chat-text-include-usage.sse");
    std::fs::read(path).expect("fixture")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn sse_decode(c: &mut Criterion) {
    let body = fixture();
    let chunks: Vec<Bytes> = body.chunks(64).map(Bytes::copy_from_slice).collect();
    let rt = runtime();
    let mut group = c.benchmark_group("upstream_sse_decode");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("openai_fixture_64B_chunks", |b| {
        b.iter(|| {
            let owned = chunks.clone();
            let input = futures_util::stream::iter(owned.into_iter().map(Ok::<_, std::io::Error>));
            let mut decoder = spillway::provider::sse::SseDecoder::new(input, 1 << 20);
            rt.block_on(async {
                let mut n = 0;
                while let Some(event) = decoder.next().await {
                    black_box(event.expect("valid event"));
                    n += 1;
                }
                n
            })
        });
    });
    group.finish();
}

fn chunk_translation(c: &mut Criterion) {
    let body = String::from_utf8(fixture()).expect("utf-8");
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let mut group = c.benchmark_group("chunk_translation");
    group.throughput(Throughput::Elements(data.len() as u64));
    group.bench_function("openai_chunks_to_events", |b| {
        b.iter(|| {
            let mut decoder = spillway::provider::openai::StreamDecoder::default();
            for d in &data {
                black_box(decoder.on_data(d).expect("valid chunk"));
            }
        });
    });
    group.finish();
}

fn spec(i: u64) -> ReplicaSpec {
    ReplicaSpec {
        id: uuid::Uuid::now_v7(),
        epoch: 1,
        origin: "bench".into(),
        model: "m".into(),
        persist_to: spillway::generation::PersistTo {
            owner: spillway::store::Owner {
                tenant_id: "t".into(),
                user_id: format!("u{i}"),
            },
            conversation_id: "c".into(),
        },
        created: 0,
    }
}

fn coalescing(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("coalescing");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("append_1000_tokens_then_one_read", |b| {
        b.iter_batched(
            || Generation::replica(spec(0), 16 * 1024, 4 << 20),
            |generation| {
                for i in 0..1000 {
                    generation.replicate(ProviderEvent::Text(format!(" tok{i}")));
                }
                let mut subscriber = generation.subscribe(0);
                rt.block_on(async { black_box(subscriber.read().await) })
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn frame_encoding(c: &mut Criterion) {
    let frame = ServerFrame::Delta {
        generation_id: "0196f3a0-7d2c-7a40-b3f1-9c8d7e6f5a4b".into(),
        epoch: 1_747_300_000_000,
        offset: 41,
        next: 42,
        text: " the quick \"brown\" fox — naïve".into(),
    };
    let mut group = c.benchmark_group("frame_encoding");
    group.throughput(Throughput::Elements(1));
    group.bench_function("delta_to_json", |b| b.iter(|| black_box(frame.to_json())));
    group.finish();
}

criterion_group!(
    benches,
    sse_decode,
    chunk_translation,
    coalescing,
    frame_encoding
);
criterion_main!(benches);

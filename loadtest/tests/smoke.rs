//! The load generator against the real gateway (the debug binary the
//! workspace build put beside this one), with tiny bounded settings: every
//! scenario that CI can afford runs end to end and its results add up.
//! Speed is not asserted here; `docs/performance.md` has the figures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `target/<profile>/spillway`, built with the workspace (fails, never
/// skips, without it).
fn gateway_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
        .parent()
        .unwrap()
        .join("spillway");
    assert!(
        bin.exists(),
        "no gateway binary at {}: build the workspace (cargo build --workspace)",
        bin.display()
    );
    bin
}

fn run(args: &[&str]) -> (tempfile::TempDir, String) {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("--gateway-bin")
        .arg(gateway_bin())
        .arg("--out")
        .arg(out.path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "loadtest {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (out, String::from_utf8(output.stdout).unwrap())
}

fn json(dir: &tempfile::TempDir, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.path().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn overhead_relays_every_token_over_every_transport() {
    let (dir, stdout) = run(&[
        "overhead",
        "--levels",
        "4",
        "--samples",
        "8",
        "--min-waves",
        "2",
        "--tokens",
        "6",
        "--delay-ms",
        "5",
    ]);
    let result = json(&dir, "overhead");
    let cells = result["cells"].as_array().unwrap();
    let transports: Vec<&str> = cells
        .iter()
        .map(|c| c["transport"].as_str().unwrap())
        .collect();
    assert_eq!(transports, ["openai-sse", "native-sse", "ws"]);
    for cell in cells {
        for side in ["direct", "gateway"] {
            let s = &cell[side];
            assert_eq!(s["replies"], 8, "{side} {cell}");
            assert_eq!(s["done"], 8, "every reply whole: {side} {cell}");
            assert_eq!(s["ttft"]["n"], 8, "{side} {cell}");
            assert_eq!(s["relay"]["n"], 8 * 6, "every token timed: {side} {cell}");
        }
    }
    assert!(stdout.contains("| ws | 4 | 8 |"), "{stdout}");
    let svg = std::fs::read_to_string(dir.path().join("overhead-ttft-p99.svg")).unwrap();
    assert_eq!(
        svg.matches("<polyline").count(),
        6,
        "a line per side and transport"
    );
}

#[test]
fn throughput_counts_what_went_through() {
    let (dir, _) = run(&[
        "throughput",
        "--streams",
        "2",
        "--secs",
        "1",
        "--tokens",
        "200",
    ]);
    let result = json(&dir, "throughput");
    let phases = result["phases"].as_array().unwrap();
    let paths: Vec<&str> = phases.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["direct", "openai-sse", "ws", "direct"]);
    let mut relayed = 0;
    for phase in phases {
        assert_eq!(phase["not_done"], 0, "{phase}");
        let replies = phase["replies"].as_u64().unwrap();
        assert!(replies >= 2, "{phase}");
        assert_eq!(phase["tokens"].as_u64().unwrap(), replies * 200, "{phase}");
        relayed += phase["tokens"].as_u64().unwrap();
    }
    assert_eq!(result["upstream_tokens_written"].as_u64().unwrap(), relayed);
}

#[test]
fn chaos_loses_no_acknowledged_message() {
    let (dir, _) = run(&["chaos", "--clients", "4", "--secs", "12"]);
    let result = json(&dir, "chaos");
    assert!(result["acknowledged"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["duplicated"], 0, "{result}");
    assert_eq!(result["silent_truncations"], 0, "{result}");
    let faults: Vec<&str> = result["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f[1].as_str().unwrap())
        .collect();
    assert_eq!(faults.len(), 8, "{faults:?}");
}

//! Configuration: defaults, file, environment overrides, and errors that
//! name the key and value.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::Path;

use spillway::config::{Config, ConfigError, ProviderKind};

fn parse(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    Config::parse(toml, Path::new("test.toml"), env)
}

#[test]
fn no_file_means_the_mock_model_on_localhost_8080() {
    let config = parse("", &[]).unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080");
    assert_eq!(config.providers.len(), 1);
    assert_eq!(config.providers[0].kind, ProviderKind::Mock);
    assert_eq!(config.models[0].name, "mock");
    assert_eq!(config.models[0].targets[0].provider, "mock");
}

#[test]
fn the_example_file_is_valid_and_matches_the_defaults() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("spillway.example.toml"),
    )
    .unwrap();
    let example = parse(&text, &[]).unwrap();
    let defaults = Config::default();
    // Every documented default is the real default.
    assert_eq!(example.server, defaults.server);
    assert_eq!(example.log, defaults.log);
    assert_eq!(example.generation, defaults.generation);
    assert_eq!(example.upstream, defaults.upstream);
    assert_eq!(example.routing, defaults.routing);
    assert_eq!(example.breaker, defaults.breaker);
    assert_eq!(example.store, defaults.store);
    assert_eq!(example.cluster, defaults.cluster);
    assert_eq!(example.auth, defaults.auth);
    assert_eq!(example.limits, defaults.limits);
    assert_eq!(example.chat, defaults.chat);
    assert_eq!(example.providers[0], defaults.providers[0]);
    assert_eq!(example.models.len(), 4);
    assert_eq!(
        example.models[3].targets.len(),
        3,
        "the fallback chain example"
    );
}

#[test]
fn environment_overrides_the_file() {
    let config = parse(
        "[server]\nlisten = \"127.0.0.1:1000\"\n",
        &[
            ("SPILLWAY_LISTEN", "0.0.0.0:9000"),
            ("SPILLWAY_GENERATION__MAX_FRAME_BYTES", "8192"),
            ("SPILLWAY_LOG_FORMAT", "json"),
            ("SPILLWAY_CONFIG", "/ignored/not/an/override"),
        ],
    )
    .unwrap();
    assert_eq!(config.server.listen, "0.0.0.0:9000");
    assert_eq!(config.generation.max_frame_bytes, 8192);
    assert_eq!(config.log.format, spillway::config::LogFormat::Json);
}

#[test]
fn an_invalid_listen_address_is_named_with_its_value() {
    let err = parse("[server]\nlisten = \"localhost-8080\"\n", &[]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("server.listen"), "{message}");
    assert!(message.contains("localhost-8080"), "{message}");
}

#[test]
fn an_environment_override_is_named_in_its_error() {
    let err = parse("", &[("SPILLWAY_LISTEN", "nowhere")]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("server.listen"), "{message}");
    assert!(message.contains("SPILLWAY_LISTEN"), "{message}");
    assert!(message.contains("nowhere"), "{message}");

    let err = parse("", &[("SPILLWAY_SERVER__HEARTBEAT_SECS", "soon")]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("server.heartbeat_secs"), "{message}");
    assert!(
        message.contains("SPILLWAY_SERVER__HEARTBEAT_SECS"),
        "{message}"
    );
    assert!(message.contains("soon"), "{message}");
}

#[test]
fn a_wrong_type_names_the_key_and_value() {
    let err = parse("[generation]\nmax_frame_bytes = \"big\"\n", &[]).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("generation.max_frame_bytes"), "{message}");
    assert!(message.contains("big"), "{message}");
}

#[test]
fn an_unknown_key_is_rejected_by_name() {
    let err = parse("[server]\nlisten_addr = \"127.0.0.1:1\"\n", &[]).unwrap_err();
    assert!(err.to_string().contains("listen_addr"), "{err}");
}

#[test]
fn an_unknown_provider_kind_is_rejected() {
    let err = parse(
        "[[providers]]\nname = \"x\"\nkind = \"cohere\"\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"x\", model = \"m\" }]\n",
        &[],
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("providers[0].kind"), "{message}");
    assert!(message.contains("cohere"), "{message}");
}

#[test]
fn a_model_must_target_a_configured_provider() {
    let err = parse(
        "[[models]]\nname = \"gpt\"\ntargets = [{ provider = \"openai\", model = \"gpt-4o\" }]\n",
        &[],
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("models[0].targets[0].provider"),
        "{message}"
    );
    assert!(message.contains("openai"), "{message}");
}

#[test]
fn bounds_are_validated() {
    for (toml, key) in [
        ("[server]\nheartbeat_secs = 60\n", "server.heartbeat_secs"),
        ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes"),
        (
            "[generation]\nmax_frame_bytes = 8\n",
            "generation.max_frame_bytes",
        ),
        ("[generation]\nmax_live = 0\n", "generation.max_live"),
        (
            "[upstream]\nmax_event_bytes = 10\n",
            "upstream.max_event_bytes",
        ),
        (
            "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"ftp://x\"\n",
            "providers[0].base_url",
        ),
        (
            "[[providers]]\nname = \"a\"\nkind = \"mock\"\n[[providers]]\nname = \"a\"\nkind = \"mock\"\n",
            "providers[1].name",
        ),
    ] {
        let err = parse(toml, &[]).unwrap_err();
        assert!(err.to_string().contains(key), "{toml}: {err}");
    }
}

#[test]
fn invalid_toml_says_where() {
    let err = parse("[server\nlisten = 1", &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert!(err.to_string().contains("line"), "{err}");
}

#[test]
fn routing_knobs_are_validated() {
    for (toml, key) in [
        ("[routing]\nmax_attempts = 0\n", "routing.max_attempts"),
        (
            "[routing]\nbackoff_base_ms = 500\nbackoff_max_ms = 100\n",
            "routing.backoff_max_ms",
        ),
        (
            "[routing]\nttft_timeout_ms = 0\n",
            "routing.ttft_timeout_ms",
        ),
        ("[breaker]\nfailure_ratio = 1.5\n", "breaker.failure_ratio"),
        (
            "[breaker]\nhalf_open_probes = 0\n",
            "breaker.half_open_probes",
        ),
        (
            "[[models]]\nname = \"m\"\ntargets = [{ provider = \"mock\", model = \"m\", weight = 0 }]\n",
            "models[0].targets[0].weight",
        ),
        (
            "[[models]]\nname = \"m\"\ntargets = [{ provider = \"mock\", model = \"m\", idle_timeout_ms = 0 }]\n",
            "models[0].targets[0].idle_timeout_ms",
        ),
        (
            "[[models]]\nname = \"m\"\nfallback_on = [\"everything\"]\ntargets = [{ provider = \"mock\", model = \"m\" }]\n",
            "models[0].fallback_on",
        ),
    ] {
        let err = parse(toml, &[]).unwrap_err();
        assert!(err.to_string().contains(key), "{toml}: {err}");
    }
}

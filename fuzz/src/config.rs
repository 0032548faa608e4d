//! `config`: configuration parsing (`config::Config::parse`) with
//! `SPILLWAY_*` environment overrides.
//!
//! Input: the TOML text, then optionally a NUL byte and environment
//! overrides, one per line, `NAME=value` (`SPILLWAY_` is prefixed to every
//! name, so `LISTEN=...` is the `SPILLWAY_LISTEN` alias and
//! `GENERATION__MAX_FRAME_BYTES=8` a section override). Invalid UTF-8 is
//! replaced.
//!
//! Checks:
//! - no panic (in parsing, overriding, validating or printing the error);
//! - an accepted configuration passes `validate` again;
//! - it round-trips: serialized back to TOML (`toml::to_string`), it parses
//!   with no environment to an equal `Config`, so what `check-config`
//!   accepts is exactly describable as a file.

use std::path::Path;

use spillway::config::Config;

/// At most this many environment overrides per input.
const MAX_VARS: usize = 32;

/// Splits an input into the TOML text and the environment.
pub fn split_input(data: &[u8]) -> (String, Vec<(String, String)>) {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], Some(&data[nul + 1..])),
        None => (data, None),
    };
    let text = String::from_utf8_lossy(text).into_owned();
    let env = env
        .map(|env| {
            String::from_utf8_lossy(env)
                .split('\n')
                .filter(|line| !line.is_empty())
                .take(MAX_VARS)
                .map(|line| {
                    let (name, value) = line.split_once('=').unwrap_or((line, ""));
                    (format!("SPILLWAY_{name}"), value.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    (text, env)
}

/// Runs the checks on one fuzz input.
pub fn check(data: &[u8]) {
    let (text, env) = split_input(data);
    let path = Path::new("fuzz.toml");
    let config = match Config::parse(&text, path, env) {
        Ok(config) => config,
        Err(err) => {
            // Printing the error must not panic.
            let message = err.to_string();
            crate::trace!("config: rejected: {message}");
            return;
        }
    };
    crate::trace!("config: accepted");
    if let Err(err) = config.validate() {
        panic!("an accepted config fails validate: {err}");
    }
    let serialized = match toml::to_string(&config) {
        Ok(serialized) => serialized,
        Err(err) => panic!("an accepted config does not serialize to TOML: {err}\n{config:?}"),
    };
    match Config::parse(&serialized, path, Vec::new()) {
        Ok(again) => assert!(
            again == config,
            "the config changed in a TOML round trip:\n before: {config:?}\n after: {again:?}\n toml:\n{serialized}"
        ),
        Err(err) => {
            panic!("an accepted config, serialized, is rejected: {err}\ntoml:\n{serialized}")
        }
    }
}

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure
//! The deployment files, checked against the crate and a running gateway:
//! `Dockerfile`, `.dockerignore`, `fly.toml` and the systemd unit in
//! `docs/deploy.md`. The development machines cannot run `docker build`
//! (there is no Docker daemon), so what a build or a deploy would reveal
//! late is checked here: stages, the non-root user, `--locked`, the binary
//! the entrypoint runs, what the build context holds, the ports, the drain
//! timing, and the health and metrics paths Fly polls.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use spillway::config::Config;

/// The repository root.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Seconds Fly allows between `kill_signal` and SIGKILL on shared-CPU
/// machines; a longer `kill_timeout` is cut to it.
const FLY_MAX_KILL_TIMEOUT_SECS: u64 = 300;

/// Seconds a platform must wait after SIGTERM on top of the drain timeout
/// and the persister's flush: after the drain timeout the gateway gives the
/// cancelled replies, then the last connections, up to 5 s each
/// (`AFTER_CANCEL` in `src/http/server.rs`), then leaves the cluster.
const STOP_MARGIN_SECS: u64 = 15;

fn read(relative: &str) -> String {
    let path = Path::new(ROOT).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

// --- Dockerfile -------------------------------------------------------------

/// One instruction, continuation lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    /// Upper-cased: `RUN`, `COPY`, ...
    keyword: String,
    /// Everything after the keyword.
    args: String,
    /// Where it starts, for messages.
    line: usize,
}

/// One `FROM` and what follows it.
#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &Instruction> {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    fn last(&self, keyword: &str) -> Option<&Instruction> {
        self.all(keyword).last()
    }

    /// `ENV` values set in this stage, later ones winning.
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for instruction in self.all("ENV") {
            let words = shell_words(&instruction.args);
            if words.first().is_some_and(|w| w.contains('=')) {
                for word in words {
                    let (key, value) = word
                        .split_once('=')
                        .unwrap_or_else(|| panic!("line {}: ENV {word}", instruction.line));
                    env.insert(key.to_owned(), value.to_owned());
                }
            } else {
                // The legacy form: `ENV KEY the rest is the value`.
                let (key, value) = instruction
                    .args
                    .trim()
                    .split_once(char::is_whitespace)
                    .unwrap();
                env.insert(key.to_owned(), value.trim().to_owned());
            }
        }
        env
    }
}

/// A `COPY` (or `ADD`): its flags' `--from` stage, sources and destination.
#[derive(Debug)]
struct CopyInstruction {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
    line: usize,
}

fn copies(stage: &Stage) -> Vec<CopyInstruction> {
    stage
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        .map(|i| {
            let (flags, mut paths): (Vec<String>, Vec<String>) = words(&i.args)
                .into_iter()
                .partition(|w| w.starts_with("--"));
            let from = flags
                .iter()
                .find_map(|f| f.strip_prefix("--from="))
                .map(str::to_owned);
            let dest = paths.pop().expect("COPY has a destination");
            assert!(!paths.is_empty(), "line {}: COPY without a source", i.line);
            CopyInstruction {
                from,
                sources: paths,
                dest,
                line: i.line,
            }
        })
        .collect()
}

/// Parses a Dockerfile: comments and blank lines dropped, `\` continuations
/// joined (comment lines inside a continuation are dropped too, as Docker
/// does), instructions grouped by stage.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(body) => (true, body),
            None => (false, trimmed),
        };
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        joined.push_str(body.trim());
        joined.push(' ');
        if continues {
            pending = Some((start, joined));
            continue;
        }
        assert!(
            !joined.contains("<<"),
            "line {start}: heredocs are not understood by this check"
        );
        let joined = joined.trim();
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((joined, ""));
        instructions.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
            line: start,
        });
    }
    assert!(pending.is_none(), "the Dockerfile ends in a continuation");

    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        if instruction.keyword == "FROM" {
            let words: Vec<String> = shell_words(&instruction.args)
                .into_iter()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, r#as, name] if r#as.eq_ignore_ascii_case("as") => Some(name.clone()),
                [_] => None,
                other => panic!("line {}: FROM {other:?}", instruction.line),
            };
            stages.push(Stage {
                image: words[0].clone(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(instruction);
        } else {
            assert_eq!(
                instruction.keyword, "ARG",
                "line {}: only ARG may come before the first FROM",
                instruction.line
            );
        }
    }
    stages
}

/// The arguments of an instruction: the exec form (a JSON array) or
/// shell-like words.
fn words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|err| panic!("bad exec form {args}: {err}"))
    } else {
        shell_words(args)
    }
}

/// Splits on whitespace, honouring single and double quotes and backslash
/// escapes (enough for FROM, COPY and ENV lines).
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.extend(chars.next()),
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                word.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {text}");
    if in_word {
        words.push(word);
    }
    words
}

fn dockerfile() -> Vec<Stage> {
    parse_dockerfile(&read("Dockerfile"))
}

/// The stage that compiles: the one whose RUN invokes `cargo build`.
fn builder(stages: &[Stage]) -> &Stage {
    stages
        .iter()
        .find(|s| s.all("RUN").any(|r| r.args.contains("cargo build")))
        .expect("a stage runs `cargo build`")
}

fn builder_workdir(builder: &Stage) -> String {
    builder
        .last("WORKDIR")
        .expect("the builder sets WORKDIR")
        .args
        .clone()
}

/// The `[[bin]]` names in Cargo.toml.
fn cargo_bins() -> Vec<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["bin"]
        .as_array()
        .expect("Cargo.toml declares [[bin]]")
        .iter()
        .map(|bin| bin["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The port of a `host:port` listen address.
fn port_of(listen: &str) -> u16 {
    listen
        .parse::<std::net::SocketAddr>()
        .unwrap_or_else(|err| panic!("{listen}: {err}"))
        .port()
}

// --- .dockerignore ------------------------------------------------------------

/// One `.dockerignore` line.
#[derive(Debug)]
struct IgnorePattern {
    negated: bool,
    segments: Vec<String>,
}

fn dockerignore() -> Vec<IgnorePattern> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
            IgnorePattern {
                negated,
                segments: pattern
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_owned)
                    .collect(),
            }
        })
        .collect()
}

/// Whether Docker leaves `path` (relative to the context root) out of the
/// build context: the last pattern that matches the path or one of its
/// parent directories decides, `!` letting it back in.
fn ignored(patterns: &[IgnorePattern], path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut excluded = false;
    for pattern in patterns {
        let hit = (1..=segments.len()).any(|n| glob_path(&pattern.segments, &segments[..n]));
        if hit {
            excluded = !pattern.negated;
        }
    }
    excluded
}

/// Path glob: `**` spans any number of segments, others match one.
fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| glob_path(rest, &path[skip..]))
        }
        Some((first, rest)) => {
            !path.is_empty()
                && glob_segment(first.as_bytes(), path[0].as_bytes())
                && glob_path(rest, &path[1..])
        }
    }
}

/// Segment glob: `*` any run of bytes, `?` one byte.
fn glob_segment(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| glob_segment(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && glob_segment(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && glob_segment(rest, &name[1..]),
    }
}

/// Every file under `dir` (or `dir` itself when it is a file), relative to
/// the repository root.
fn files_under(relative: &str) -> Vec<String> {
    let path = Path::new(ROOT).join(relative);
    if path.is_file() {
        return vec![relative.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&path).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        files.extend(files_under(&format!("{relative}/{name}")));
    }
    files
}

// --- fly.toml -----------------------------------------------------------------

fn fly() -> toml::Table {
    toml::from_str(&read("fly.toml")).expect("fly.toml is valid TOML")
}

/// fly.toml's `[env]`, as strings (Fly passes every value as one).
fn fly_env(fly: &toml::Table) -> BTreeMap<String, String> {
    fly["env"]
        .as_table()
        .expect("fly.toml has [env]")
        .iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (key.clone(), value)
        })
        .collect()
}

/// The environment a Fly machine runs with: the image's ENV, then
/// fly.toml's `[env]` over it.
fn machine_env(fly: &toml::Table) -> BTreeMap<String, String> {
    let stages = dockerfile();
    let mut env = stages.last().unwrap().env();
    env.extend(fly_env(fly));
    env
}

/// The configuration a Fly machine loads (no config file): through the
/// same parse, override and validation path as `spillway serve`.
fn machine_config(fly: &toml::Table) -> Config {
    Config::parse("", Path::new("<fly.toml [env]>"), machine_env(fly))
        .unwrap_or_else(|err| panic!("the Fly machine's environment is rejected: {err}"))
}

/// Seconds in a Fly duration: an integer (seconds) or a Go-style string
/// such as `"55s"`, `"1m30s"`.
fn fly_secs(value: &toml::Value) -> u64 {
    if let Some(secs) = value.as_integer() {
        return u64::try_from(secs).unwrap();
    }
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a duration: {value}"));
    let mut total = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {text}"));
        number.clear();
        total += match c {
            'h' => n * 3600,
            'm' => n * 60,
            's' => n,
            _ => panic!("unit {c} in duration {text}"),
        };
    }
    assert!(number.is_empty(), "duration {text} lacks a unit");
    total
}

fn http_service(fly: &toml::Table) -> &toml::Table {
    fly["http_service"]
        .as_table()
        .expect("fly.toml has [http_service]")
}

/// The paths Fly polls: the HTTP service checks and the metrics path.
fn check_paths(fly: &toml::Table) -> Vec<String> {
    http_service(fly)["checks"]
        .as_array()
        .expect("[[http_service.checks]]")
        .iter()
        .map(|check| check["path"].as_str().unwrap().to_owned())
        .collect()
}

/// A gateway configured as a Fly machine would be (its data dir in a temp
/// dir instead of the image's).
async fn fly_gateway() -> (TestGateway, tempfile::TempDir) {
    let mut config = machine_config(&fly());
    let data = tempfile::tempdir().unwrap();
    config.store.data_dir = data.path().display().to_string();
    (TestGateway::start_with(config).await, data)
}

async fn get_status(gateway: &TestGateway, path: &str) -> (u16, String) {
    let response = client().get(gateway.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

// --- docs/deploy.md -----------------------------------------------------------

/// The systemd unit in docs/deploy.md: the fenced block holding
/// `[Service]`, as `key → values` (a key may repeat, e.g. `Environment=`).
fn documented_unit() -> BTreeMap<String, Vec<String>> {
    let doc = read("docs/deploy.md");
    let block = doc
        .split("```")
        .skip(1)
        .step_by(2)
        .find(|block| block.contains("[Service]"))
        .expect("docs/deploy.md shows a systemd unit with [Service]");
    let mut unit: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in block.lines().skip(1).map(str::trim) {
        if let Some((key, value)) = line.split_once('=')
            && !line.starts_with('#')
        {
            unit.entry(key.trim().to_owned())
                .or_default()
                .push(value.trim().to_owned());
        }
    }
    unit
}

// --- tests: the image ---------------------------------------------------------

/// The image is built in one stage and run from another, so the compiler,
/// the registry cache and the sources stay out of what is shipped.
#[test]
fn dockerfile_builds_in_one_stage_and_ships_another() {
    let stages = dockerfile();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:#?}");
    let builder = builder(&stages);
    let runtime = stages.last().unwrap();
    assert!(
        builder.image.starts_with("rust:"),
        "the builder compiles on a Rust image: {}",
        builder.image
    );
    assert!(
        !std::ptr::eq(builder, runtime) && !runtime.image.starts_with("rust:"),
        "the final stage is not the builder: {}",
        runtime.image
    );
    let name = builder.name.as_deref().expect("the builder stage is named");
    let copied_from_builder = copies(runtime)
        .into_iter()
        .any(|c| c.from.as_deref() == Some(name));
    assert!(copied_from_builder, "the runtime stage copies from {name}");
}

/// The final stage sets a numeric, non-root user: a container escape
/// starts unprivileged, and Kubernetes' `runAsNonRoot` can verify a number
/// (not a name) without the image's passwd file.
#[test]
fn final_image_runs_as_a_numeric_non_root_user() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let user = runtime.last("USER").expect("the final stage sets USER");
    let (uid, gid) = match user.args.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (user.args.as_str(), None),
    };
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {} is not a numeric UID", user.args));
    assert_ne!(uid, 0, "USER is root");
    if let Some(gid) = gid {
        let gid: u32 = gid.parse().expect("numeric GID");
        assert_ne!(gid, 0, "the group is root");
    }
    // Nothing after USER switches back to root.
    let after_user = runtime
        .instructions
        .iter()
        .skip_while(|i| i.line != user.line)
        .skip(1);
    for instruction in after_user {
        assert_ne!(
            instruction.keyword, "RUN",
            "line {}: RUN after USER",
            instruction.line
        );
    }
    // The data dir exists and belongs to that user: a command of the final
    // stage's RUNs gives it to the UID (`install -d -o UID … DIR` or
    // `chown UID[:GID] … DIR`).
    let data_dir = runtime
        .env()
        .get("SPILLWAY_DATA_DIR")
        .cloned()
        .expect("the image sets SPILLWAY_DATA_DIR");
    let owner = uid.to_string();
    let owned = |words: &[String]| match words.first().map(String::as_str) {
        Some("install") => words
            .windows(2)
            .any(|w| (w[0] == "-o" || w[0] == "--owner") && w[1] == owner),
        Some("chown") => words
            .iter()
            .skip(1)
            .find(|w| !w.starts_with('-'))
            .is_some_and(|spec| spec.split(':').next() == Some(owner.as_str())),
        _ => false,
    };
    let gives = runtime
        .all("RUN")
        .flat_map(|r| r.args.split("&&").map(shell_words).collect::<Vec<_>>())
        .any(|words| owned(&words) && words.contains(&data_dir));
    assert!(gives, "no RUN gives {data_dir} to UID {uid}");
}

/// The release build uses Cargo.lock as committed (`--locked`), builds the
/// `[[bin]]` the entrypoint runs, and the runtime stage copies exactly that
/// binary to exactly the path the exec-form ENTRYPOINT names.
#[test]
fn locked_release_build_produces_the_binary_the_entrypoint_runs() {
    let stages = dockerfile();
    let builder = builder(&stages);
    let runtime = stages.last().unwrap();
    let bins = cargo_bins();

    let builds: Vec<&Instruction> = builder
        .all("RUN")
        .filter(|r| r.args.contains("cargo build"))
        .collect();
    for build in &builds {
        for command in build.args.split("&&").filter(|c| c.contains("cargo build")) {
            let args = shell_words(command);
            for flag in ["--release", "--locked"] {
                assert!(
                    args.iter().any(|a| a == flag),
                    "line {}: {command} lacks {flag}",
                    build.line
                );
            }
            let bin = args
                .iter()
                .skip_while(|a| *a != "--bin")
                .nth(1)
                .unwrap_or_else(|| panic!("line {}: {command} names no --bin", build.line));
            assert!(
                bins.contains(bin),
                "--bin {bin} is not a [[bin]] of Cargo.toml: {bins:?}"
            );
        }
    }

    let entrypoint = runtime
        .last("ENTRYPOINT")
        .expect("the final stage sets ENTRYPOINT");
    assert!(
        entrypoint.args.starts_with('['),
        "ENTRYPOINT must be the exec form, or SIGTERM reaches /bin/sh instead of the gateway: {}",
        entrypoint.args
    );
    let program = words(&entrypoint.args).remove(0);
    let program_name = Path::new(&program)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        bins.contains(&program_name),
        "ENTRYPOINT runs {program}, not a [[bin]]: {bins:?}"
    );

    let builder_name = builder.name.as_deref().unwrap();
    let shipped = copies(runtime)
        .into_iter()
        .find(|c| c.from.as_deref() == Some(builder_name))
        .expect("the runtime stage copies the binary from the builder");
    assert_eq!(
        shipped.sources,
        [format!(
            "{}/target/release/{program_name}",
            builder_workdir(builder)
        )],
        "line {}: the copied file is the release build of the entrypoint's binary",
        shipped.line
    );
    assert_eq!(
        shipped.dest, program,
        "the binary lands where ENTRYPOINT runs it"
    );
}

/// The image's default command is a subcommand the binary really has:
/// `spillway <CMD…> --help` succeeds.
#[test]
fn image_cmd_is_a_subcommand_of_the_binary() {
    let stages = dockerfile();
    let runtime = stages.last().unwrap();
    let cmd = runtime.last("CMD").expect("the final stage sets CMD");
    assert!(cmd.args.starts_with('['), "CMD in exec form: {}", cmd.args);
    let mut args = words(&cmd.args);
    args.push("--help".into());
    let output = std::process::Command::new(BIN)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "spillway {args:?} fails: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every file the build copies from the context exists, and `.dockerignore`
/// lets it through; so does every file the crate compiles in with
/// `include_str!`/`include_bytes!` (a new embedded asset outside the copied
/// directories would otherwise break `docker build` only).
#[test]
fn every_copied_and_embedded_file_is_in_the_build_context() {
    let stages = dockerfile();
    let patterns = dockerignore();
    let mut copied = Vec::new();
    for stage in &stages {
        for copy in copies(stage).into_iter().filter(|c| c.from.is_none()) {
            for source in &copy.sources {
                let source = source.trim_start_matches("./").trim_end_matches('/');
                assert!(
                    !source.contains(['*', '?', '[']),
                    "line {}: globs are not checked: {source}",
                    copy.line
                );
                assert!(
                    Path::new(ROOT).join(source).exists(),
                    "line {}: COPY {source}: no such file in the repository",
                    copy.line
                );
                for file in files_under(source) {
                    assert!(
                        !ignored(&patterns, &file),
                        "line {}: {file} is copied but .dockerignore leaves it out",
                        copy.line
                    );
                }
                copied.push(source.to_owned());
            }
        }
    }

    let mut embedded = Vec::new();
    for file in files_under("src")
        .into_iter()
        .filter(|f| f.ends_with(".rs"))
    {
        // Release code only: unit-test modules (`#[cfg(test)]`, at the end
        // of a file by this crate's convention) may embed test fixtures.
        let text = read(&file);
        let release = text.split("#[cfg(test)]").next().unwrap();
        for marker in ["include_str!(", "include_bytes!("] {
            for rest in release.split(marker).skip(1) {
                let literal = rest
                    .trim_start()
                    .strip_prefix('"')
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_else(|| panic!("{file}: {marker} without a string literal"));
                let dir = Path::new(&file).parent().unwrap();
                embedded.push(normalize(&dir.join(literal)));
            }
        }
    }
    assert!(!embedded.is_empty(), "the scan finds the embedded assets");
    for path in embedded {
        let text = path.to_str().unwrap();
        assert!(
            copied.iter().any(|c| path.starts_with(c)),
            "{text} is compiled in but the Dockerfile does not copy it: {copied:?}"
        );
        assert!(
            !ignored(&patterns, text),
            "{text} is compiled in but .dockerignore leaves it out"
        );
    }
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                assert!(out.pop(), "{} leaves the repository", path.display());
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Build outputs, git history and local data stay out of the context: they
/// are large, would bust the layer cache on every build, and may hold
/// private data.
#[test]
fn dockerignore_keeps_build_outputs_git_and_local_data_out() {
    let patterns = dockerignore();
    for path in [
        "target",
        "target/release/spillway",
        "fuzz/target",
        "fuzz/target/debug/x",
        ".git",
        ".git/config",
        "data/spillway.db",
        "data/journal/00000000000000000001.seg",
    ] {
        assert!(ignored(&patterns, path), "{path} reaches the build context");
    }
    // The matcher itself: the allowlist lets sources back in.
    assert!(!ignored(&patterns, "src/main.rs"));
}

// --- tests: Fly.io --------------------------------------------------------------

/// Fly stops a machine with SIGTERM (what starts the drain; Fly's default
/// is SIGINT) and waits `kill_timeout` before SIGKILL. That must cover the
/// drain timeout *and* the persister's flush after it, with a margin, as
/// the gateway reads them from the machine's environment.
#[test]
fn fly_kill_timeout_covers_the_drain_and_the_flush() {
    let fly = fly();
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));
    let kill_timeout = fly_secs(&fly["kill_timeout"]);

    let env = fly_env(&fly);
    let grace: u64 = env
        .get("SPILLWAY_SERVER__SHUTDOWN_GRACE_SECS")
        .expect("[env] sets the drain timeout explicitly")
        .parse()
        .expect("a number of seconds");
    let config = machine_config(&fly);
    assert_eq!(
        config.server.shutdown_grace_secs, grace,
        "the variable reaches server.shutdown_grace_secs"
    );
    assert!(
        kill_timeout > grace,
        "kill_timeout {kill_timeout} s ≤ the drain timeout {grace} s"
    );

    let flush = config.store.shutdown_flush_secs;
    let needed = grace + flush + STOP_MARGIN_SECS;
    assert!(
        kill_timeout >= needed,
        "kill_timeout {kill_timeout} s < drain {grace} s + flush {flush} s + margin {STOP_MARGIN_SECS} s"
    );
    assert!(
        kill_timeout <= FLY_MAX_KILL_TIMEOUT_SECS,
        "Fly cuts kill_timeout to {FLY_MAX_KILL_TIMEOUT_SECS} s on shared CPUs"
    );
}

/// The machine's environment (image ENV + `[env]`) passes the gateway's own
/// validation, and holds no secrets: URLs with passwords and provider keys
/// belong in `fly secrets`, not in a committed file.
#[test]
fn fly_env_is_valid_config_and_holds_no_secrets() {
    let fly = fly();
    let config = machine_config(&fly);
    assert_eq!(
        config.log.format,
        spillway::config::LogFormat::Json,
        "JSON logs for Fly's log shipping"
    );
    assert_eq!(
        config.auth.client_ip_header, "Fly-Client-IP",
        "behind Fly's proxy, per-address limits must read the proxy's header"
    );
    assert!(config.auth.enabled, "a public gateway requires credentials");

    // The URLs may hold passwords; the provider keys are the variables the
    // example config's providers name in `api_key_env`.
    let mut secret_names = vec![
        "SPILLWAY_DATABASE_URL".to_owned(),
        "SPILLWAY_REDIS_URL".to_owned(),
    ];
    let example: toml::Table = toml::from_str(&read("spillway.example.toml")).unwrap();
    secret_names.extend(
        example["providers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.get("api_key_env")?.as_str().map(str::to_owned)),
    );
    assert!(
        secret_names.len() > 2,
        "the example names provider key variables"
    );
    let image_env = dockerfile().last().unwrap().env();
    for (source, env) in [
        ("fly.toml [env]", fly_env(&fly)),
        ("Dockerfile ENV", image_env),
    ] {
        for key in env.keys() {
            let upper = key.to_ascii_uppercase();
            assert!(
                !secret_names.contains(key)
                    && !upper.contains("SECRET")
                    && !upper.contains("PASSWORD")
                    && !upper.ends_with("_KEY"),
                "{source} sets {key}: secrets come from `fly secrets set`"
            );
        }
    }
}

/// One port everywhere: the address the gateway listens on (image and
/// `[env]`), the port the image exposes, the port Fly's proxy forwards to,
/// and the port Fly scrapes metrics from (the public listener, as long as
/// no separate admin listener takes `/metrics` away from it).
#[test]
fn ports_agree_across_fly_the_image_and_the_listen_address() {
    let fly = fly();
    let stages = dockerfile();
    let runtime = stages.last().unwrap();

    let image_listen = runtime
        .env()
        .get("SPILLWAY_LISTEN")
        .cloned()
        .expect("the image sets SPILLWAY_LISTEN");
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .flat_map(|e| shell_words(&e.args))
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
        .collect();
    let config = machine_config(&fly);
    let internal_port = http_service(&fly)["internal_port"].as_integer().unwrap();
    let metrics_port = fly["metrics"]["port"].as_integer().expect("[metrics] port");

    let port = port_of(&config.server.listen);
    assert_eq!(
        port_of(&image_listen),
        port,
        "the image and [env] listen on one port"
    );
    assert!(
        config.server.listen.starts_with("0.0.0.0:"),
        "Fly's proxy reaches 0.0.0.0, not loopback"
    );
    assert_eq!(exposed, [port], "EXPOSE names the listen port");
    assert_eq!(
        i64::from(port),
        internal_port,
        "[http_service] internal_port"
    );
    assert_eq!(i64::from(port), metrics_port, "[metrics] port");
    assert!(
        !fly_env(&fly).contains_key("SPILLWAY_SERVER__ADMIN_LISTEN"),
        "with an admin listener, /metrics leaves port {port}: change [metrics] port with it"
    );
}

/// The service suits long-lived streams on several machines: never stopped
/// for being idle, at least two running, balanced by connections (every
/// stream is one), HTTPS only, and polled by health checks that give up
/// before the next one is due.
#[test]
fn fly_service_keeps_long_lived_streams_on_several_machines() {
    let fly = fly();
    let service = http_service(&fly);
    assert!(
        matches!(&service["auto_stop_machines"], toml::Value::Boolean(false))
            || service["auto_stop_machines"].as_str() == Some("off"),
        "auto_stop_machines would cut streams: {}",
        service["auto_stop_machines"]
    );
    assert!(service["min_machines_running"].as_integer().unwrap() >= 2);
    assert_eq!(service["force_https"].as_bool(), Some(true));

    let concurrency = service["concurrency"]
        .as_table()
        .expect("[http_service.concurrency]");
    assert_eq!(concurrency["type"].as_str(), Some("connections"));
    let soft = concurrency["soft_limit"].as_integer().unwrap();
    let hard = concurrency["hard_limit"].as_integer().unwrap();
    assert!(
        0 < soft && soft < hard,
        "soft_limit {soft} < hard_limit {hard}"
    );

    let checks = service["checks"]
        .as_array()
        .expect("[[http_service.checks]]");
    assert!(!checks.is_empty());
    for check in checks {
        assert_eq!(
            check["method"]
                .as_str()
                .map(str::to_ascii_uppercase)
                .as_deref(),
            Some("GET")
        );
        assert!(
            fly_secs(&check["timeout"]) < fly_secs(&check["interval"]),
            "{check}"
        );
        assert!(fly_secs(&check["grace_period"]) > 0, "{check}");
    }

    let dockerfile = fly["build"]["dockerfile"]
        .as_str()
        .expect("[build] dockerfile");
    assert!(
        Path::new(ROOT).join(dockerfile).is_file(),
        "{dockerfile} exists"
    );
}

/// Every health-check path Fly polls answers 200 on a gateway configured
/// exactly as a Fly machine is (no credentials: Fly's checker has none).
#[tokio::test]
async fn fly_health_check_paths_answer_200_on_a_real_gateway() {
    let paths = check_paths(&fly());
    assert!(
        paths.contains(&"/readyz".to_owned()),
        "Fly polls readiness: {paths:?}"
    );
    let (gateway, _data) = fly_gateway().await;
    for path in paths {
        let (status, body) = get_status(&gateway, &path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    gateway.shutdown().await;
}

/// The metrics path Fly scrapes answers 200, without credentials, on a
/// gateway configured as a Fly machine is.
#[tokio::test]
async fn fly_metrics_path_answers_200_on_a_real_gateway() {
    let fly = fly();
    let path = fly["metrics"]["path"]
        .as_str()
        .expect("[metrics] path")
        .to_owned();
    let (gateway, _data) = fly_gateway().await;
    let (status, body) = get_status(&gateway, &path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    gateway.shutdown().await;
}

// --- tests: a plain VM ------------------------------------------------------------

/// The systemd unit in docs/deploy.md stops the gateway the way its drain
/// expects: SIGTERM, then enough time for the drain timeout and the flush
/// it sets (or the defaults) before systemd's SIGKILL; and it raises the
/// file-descriptor limit (every connection is one).
#[test]
fn documented_systemd_unit_stops_with_sigterm_and_waits_for_the_drain() {
    let unit = documented_unit();
    let one = |key: &str| -> &str {
        match unit.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("the unit sets {key} once: {other:?}"),
        }
    };
    assert_eq!(one("KillSignal"), "SIGTERM");
    let stop: u64 = one("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    let limit: u64 = one("LimitNOFILE").parse().expect("a number");
    assert!(
        limit > 1024,
        "LimitNOFILE {limit} is no higher than the usual default"
    );

    let env: Vec<(String, String)> = unit
        .get("Environment")
        .into_iter()
        .flatten()
        .flat_map(|line| shell_words(line))
        .filter_map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let config = Config::parse("", Path::new("<systemd unit>"), env)
        .unwrap_or_else(|err| panic!("the unit's Environment= is rejected: {err}"));
    let grace = config.server.shutdown_grace_secs;
    let flush = config.store.shutdown_flush_secs;
    assert!(
        stop >= grace + flush + STOP_MARGIN_SECS,
        "TimeoutStopSec {stop} < drain {grace} s + flush {flush} s + margin {STOP_MARGIN_SECS} s"
    );
}

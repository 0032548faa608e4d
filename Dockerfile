# Spillway's container image: one static-ish binary on a slim Debian.
#
#   docker build -t spillway .
#   docker run --rm -p 8080:8080 spillway          # the mock model on :8080
#
# docs/deploy.md explains the choices; tests/deploy.rs checks this file
# (stages, USER, --locked, the binary's name, COPY sources, EXPOSE) because
# the development machines cannot run `docker build`.

# --- builder ---------------------------------------------------------------
# rust-toolchain.toml pins 1.95.0 for development; the image's 1.95 toolchain
# builds the same code (Cargo.toml's rust-version = "1.95"). The toolchain
# file is not copied, so rustup does not fetch clippy and rustfmt here.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when
# Cargo.toml, Cargo.lock or benches/ change, not on every source edit.
# Stub sources stand in for the crate; benches/ is copied because Cargo
# checks that every [[bench]] target's file exists before it builds anything.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin spillway \
    && rm -rf src

# The crate. Static assets and migrations are compiled in (include_str!),
# so they are needed here and nowhere else. COPY keeps the files' own
# modification times, which may be older than the stub build: touch the
# roots so Cargo rebuilds the crate instead of shipping the stub.
COPY src ./src
COPY static ./static
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin spillway

# --- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates: provider calls verify TLS against the system roots.
# A fixed numeric UID/GID, so orchestrators that require a non-root numeric
# user (Kubernetes runAsNonRoot) accept the image and volume ownership is
# predictable. The data dir holds the default SQLite file and the
# persister's journal (store.data_dir); mount a volume there to keep them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 spillway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/spillway --shell /usr/sbin/nologin spillway \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/spillway

COPY --from=builder /build/target/release/spillway /usr/local/bin/spillway

# Listen on every interface (the container's port is what is published),
# log JSON lines, keep data in the directory made above. Secrets
# (SPILLWAY_DATABASE_URL, SPILLWAY_REDIS_URL, provider keys named by
# api_key_env) are given at run time, never baked in.
ENV SPILLWAY_LISTEN=0.0.0.0:8080 \
    SPILLWAY_LOG_FORMAT=json \
    SPILLWAY_DATA_DIR=/var/lib/spillway

WORKDIR /var/lib/spillway
USER 10001:10001
EXPOSE 8080

# Exec form: the gateway is PID 1 (or Fly's init's child) and receives
# SIGTERM itself, which starts its drain. A shell form would put /bin/sh in
# between, which does not forward the signal.
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["serve"]

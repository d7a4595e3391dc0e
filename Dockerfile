# pglb image, built from source: both binaries (pglb, pglb-promoter) on debian:bookworm-slim.
#
#   docker build -t pglb:latest .                                   (from the repository root)
#   compose/up                                                      (builds this file by default)
#
# The binaries carry no debug info ([profile.release] in Cargo.toml strips it at link time),
# and .dockerignore keeps target/ out of the build context (only the two binaries pass).
#
# Needs the rust:1-bookworm and debian:bookworm-slim images and the crate registry. Without a
# container registry, compile on the host and use compose/pglb/Dockerfile.prebuilt instead (same
# runtime image; see its header). Both use the classic builder's syntax only (docker-compose v1
# works). RUST_IMAGE (build arg) names another builder image with cargo on its PATH.
# Default command: pglb --config /etc/pglb/lb.toml; the promoter container overrides the
# entrypoint with pglb-promoter (compose/compose.yaml).
ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, with placeholder sources, so that a change under src/ does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN set -eux; \
    mkdir -p src/bin; \
    touch src/lib.rs; \
    echo 'fn main() {}' > src/bin/pglb.rs; \
    echo 'fn main() {}' > src/bin/pglb-promoter.rs; \
    cargo build --release --locked --bins; \
    rm -rf src target/release/.fingerprint/pglb-*   # forget the placeholders
COPY templates templates
COPY src src
# --bins builds every binary under src/bin; the test below fails the build if one is missing.
RUN set -eux; \
    cargo build --release --locked --bins; \
    install -d /out; \
    install -m 0755 target/release/pglb target/release/pglb-promoter /out/; \
    /out/pglb --version; /out/pglb-promoter --version

FROM debian:bookworm-slim
# ca-certificates: TLS to the backends when configured. bash (in the base image) runs the health
# check helper. The user has no shell and no home; uid/gid 10001 (config files must be readable).
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 pglb; \
    useradd --system --uid 10001 --gid pglb --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pglb
COPY --from=build /out/pglb /out/pglb-promoter /usr/local/bin/
COPY compose/pglb/pglb-http-get /usr/local/bin/pglb-http-get
COPY compose/config/lb.toml /etc/pglb/lb.toml
# (no COPY --chmod: the classic builder does not know it)
RUN chmod 0755 /usr/local/bin/pglb-http-get && chmod 0644 /etc/pglb/lb.toml
USER pglb:pglb
EXPOSE 5435 5436 8404
# healthy = pglb answers and knows a primary (/health is 200 then, 503 while there is none)
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
    CMD ["pglb-http-get", "-q", "http://127.0.0.1:8404/health"]
ENTRYPOINT ["pglb", "--config", "/etc/pglb/lb.toml"]

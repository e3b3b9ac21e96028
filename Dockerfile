# syntax=docker/dockerfile:1
#
# ferry: a multi-stage build. The builder compiles the release binary; the
# runtime image is Debian slim with that one binary, running as the unprivileged
# user `ferry`, with the configuration at /etc/ferry/ferry.toml.
#
#   docker build -t ferry .
#   docker run --rm -p 8080:8080 -v $PWD/my-ferry.toml:/etc/ferry/ferry.toml:ro ferry
#
# ferry is PID 1 (exec form, no shell): it handles SIGTERM itself (stop accepting,
# finish in-flight requests up to shutdown_timeout, exit 0) and SIGHUP (reload).
# It starts no child processes, so there is nothing to reap and no init is needed.
# Give `docker stop -t` / `stop_grace_period` more than [server] shutdown_timeout.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that editing the sources does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin ferry \
    && rm -rf src
COPY src ./src
# The placeholder build above left newer artifacts than the copied sources.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin ferry \
    && cp target/release/ferry /ferry

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ferry \
    && mkdir -p /etc/ferry
COPY --from=build /ferry /usr/local/bin/ferry
# The default is deploy/docker-compose.yml's config (the `app` service); mount yours over it.
COPY deploy/ferry.toml /etc/ferry/ferry.toml
USER ferry:ferry
# Client traffic, and the admin listener (/metrics /status /healthz, runtime API).
EXPOSE 8080 9180
STOPSIGNAL SIGTERM
# `ferry health` asks the admin listener named in the config for /healthz; the
# image needs no curl for it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["ferry", "health", "--config", "/etc/ferry/ferry.toml"]
ENTRYPOINT ["ferry"]
CMD ["--config", "/etc/ferry/ferry.toml"]

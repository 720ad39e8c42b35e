# One image with every podwire binary. Static (musl) binaries: podwire-agent copies
# podwire-cni onto the node, where it must run whatever the host's libc is.
# No container engine runs on the development machines: this file is linted (hadolint) in
# CI, not built there; keep it simple enough to trust by reading.

FROM rust:1.95-alpine3.22 AS build
# gcc and musl headers for ring (TLS); pinned by the base image tag.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev gcc
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/podwire-cni target/release/podwire-agent \
       target/release/podwire-injector target/release/podwire /out/

# distroless "static": no shell, no libc, CA certificates, a nonroot user (65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
# The injector runs as this user; the agent's DaemonSet runs it as root to write the host's
# CNI directories (install/base/agent-daemonset.yaml).
USER 65532:65532
# mimalloc returns freed memory at once: the injector's memory budget assumes it (README).
ENV MIMALLOC_PURGE_DELAY=0
ENTRYPOINT ["/usr/local/bin/podwire-agent"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# sinkhole: one static-ish binary on distroless, no shell.
# Multi-arch: docker buildx build --platform linux/arm64,linux/amd64 .
# The build stage runs on the build machine's own platform and cross-compiles with
# `deno compile --target`, so no emulation is needed. Flags come from `deno task start`:
# scripts/compile.ts type-checks first, then compiles with the task's V8 flags, which the
# binary embeds for run time (the compiler itself never runs under the listener's 24 MB heap).
ARG DENO_VERSION=2.9.6

FROM --platform=$BUILDPLATFORM denoland/deno:${DENO_VERSION} AS build
ARG TARGETARCH
# The build fetches one thing, the runtime `deno compile` embeds; not Deno's version check too.
ENV DENO_NO_UPDATE_CHECK=1
WORKDIR /src
COPY deno.json deno.lock listener.ts ./
COPY scripts/compile.ts scripts/compile.ts
RUN deno run --allow-read --allow-run --allow-env scripts/compile.ts --output /out/sinkhole --arch "$TARGETARCH"

FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/sinkhole /sinkhole
# Root, as the tier this image goes into expects: Cabalmail's task definition for cabal-sinkhole
# (cabal-infra:terraform/infra/modules/ecs/sinkhole.tf) maps port 25 in awsvpc mode with no
# systemControls and no user, and ECS does not let a non-root process bind a port under 1024
# there (aws/containers-roadmap#1721); Cabalmail's own Python listener runs as root too. No
# shell, no package manager, one file: the binary. Run elsewhere as non-root on a port >= 1024.
USER root
EXPOSE 25
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["/sinkhole", "--healthcheck"]
ENTRYPOINT ["/sinkhole"]

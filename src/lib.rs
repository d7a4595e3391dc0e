//! pglb: a layer-4 load balancer for PostgreSQL primary/replica clusters.
//!
//! Module map:
//! - `config`: `lb.toml` parsed and validated into an immutable `Config`.
//! - `reload`: watching the config file and SIGHUP; validate, then hand over or refuse.
//! - `backend`: one backend's check (login + one query), health state and counters.
//! - `routing`: roles across backends (timeline fencing), lag, and the `RoutingTable` snapshot.
//! - `proxy`: accept loops, first-packet handling, the byte splice.
//! - `pg`: the few wire-protocol pieces pglb reads and writes.
//! - `http`: stats page, `/stats.json`, `/metrics`, `/health`.
//! - `metrics`: metric names and recording helpers.
//! - `promoter`: the failover sidecar (`pglb-promoter`): observe, decide (pure), act.
//! - `signals`: SIGTERM/SIGINT/SIGHUP.
//! - `store`: the consensus store (etcd) that elects one acting promoter and records the primary.
//! - `telemetry`: logging set-up shared by both binaries.
//! - `app`: wiring, lifecycle and graceful shutdown.

pub mod app;
pub mod backend;
pub mod config;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod promoter;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod signals;
pub mod store;
pub mod telemetry;

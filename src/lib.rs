//! pglb: a layer-4 load balancer for PostgreSQL primary/replica clusters.
//!
//! Module map:
//! - `config`: `lb.toml` parsed and validated into an immutable `Config`.
//! - `reload`: watching the config file and SIGHUP; validate, then hand over or refuse.
//! - `backend`: the data path's handle on a backend (counters, slots) and its checker task.
//! - `routing`: the pure routing decision (`route`): roles (timeline fencing), lag, readers.
//! - `control`: the control task that owns the backend states and publishes the `View`.
//! - `follow`: pglb's follower of the primary recorded in the store (`[store]`), feeding `control`.
//! - `view`: `View`, the one shape of the state (and the `/stats.json` schema).
//! - `proxy`: accept loops, first-packet handling, the byte splice.
//! - `pg`: the few wire-protocol pieces pglb reads and writes.
//! - `http`: stats page, `/stats.json`, `/metrics`, `/health`.
//! - `metrics`: metric names and recording helpers.
//! - `promoter`: the failover sidecar (`pglb-promoter`): observe, decide (pure), act.
//! - `ratelimit`: at most one log line per period for bursts of the same trouble.
//! - `signals`: SIGTERM/SIGINT/SIGHUP.
//! - `store`: the consensus store (etcd) that elects one acting promoter and records the primary.
//! - `telemetry`: logging set-up shared by both binaries.
//! - `tls`: TLS pglb speaks itself: to the servers (checks, promoter) and its own certificate.
//! - `app`: wiring, lifecycle and graceful shutdown.

#![forbid(unsafe_code)]

pub mod app;
pub mod backend;
pub mod config;
pub mod control;
pub mod follow;
pub mod http;
pub mod metrics;
pub mod pg;
pub mod promoter;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod view;

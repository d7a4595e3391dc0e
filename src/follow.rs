//! pglb's follower of the store (`[store] kind = "etcd"`): connects to etcd (again, once a
//! second, while it cannot), follows the recorded primary with `Store::watch_primary` and tells
//! the control task what the store says (`Event::Store`) whenever the record, the store's
//! reachability or its failed reads change, and once a second besides, so that the age of the
//! last answer stays true. It decides nothing: how writes follow the record is `routing`'s
//! business, and the control task stays the one owner of the state. `run_config` runs it for
//! the `[store]` in effect and starts it anew when a reload changes that section.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{StoreConfig, StoreKind};
use crate::control::{Event, Events};
use crate::routing::without_credentials;
use crate::store::{EtcdStore, PrimaryState, Store, StoreFailure};

/// How often the follower reports without a change (the age of the last answer), and how long
/// it waits between two attempts to set up the etcd client.
const EVERY: Duration = Duration::from_secs(1);

/// Follows the store of the `[store]` in `settings` until `token` is cancelled: none with
/// `kind = "none"`; a changed section stops the follower of the old one (its client, its watch)
/// and starts one with the new settings. The control task drops a report made under settings
/// it no longer has, so nothing of the old store reaches routing after the reload.
pub async fn run_config(
    mut settings: watch::Receiver<StoreConfig>,
    events: Events,
    token: CancellationToken,
) {
    loop {
        let cfg = settings.borrow_and_update().clone();
        let follower = token.child_token();
        let following = async {
            if cfg.kind == StoreKind::None {
                follower.cancelled().await;
            } else {
                run(cfg, events.clone(), follower.clone()).await;
            }
        };
        tokio::pin!(following);
        let changed = tokio::select! {
            // `run` ends only when cancelled: pglb is shutting down.
            _ = &mut following => return,
            changed = settings.changed() => changed.is_ok(),
        };
        if !changed {
            // No more reloads: these settings to the end.
            following.await;
            return;
        }
        follower.cancel();
        info!("store settings changed: following the store anew");
    }
}

/// Follows the store until `token` is cancelled.
pub async fn run(cfg: StoreConfig, events: Events, token: CancellationToken) {
    crate::metrics::store_zeros();
    let settings = Arc::new(cfg.clone());
    let report = |state: PrimaryState| Event::Store {
        settings: settings.clone(),
        state,
    };
    let mut connect = Failures::default();
    let store = loop {
        match EtcdStore::connect(&cfg).await {
            Ok(s) => break s,
            Err(e) => {
                let failure = redact(StoreFailure::from(&e), &cfg.endpoints);
                if connect.count == 0 {
                    warn!(error = %failure.message, kind = failure.kind, "cannot set up the store client; retrying every second (no writes until the store answers)");
                } else {
                    debug!(error = %failure.message, kind = failure.kind, "store client set-up failed again");
                }
                crate::metrics::store_errors(failure.kind, 1);
                connect.count += 1;
                connect.last = Some(failure);
                events.send(report(connect.apply(PrimaryState::default())));
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(EVERY) => {}
                }
            }
        }
    };
    if connect.count > 0 {
        info!("store client set up");
    }
    let mut primary = store.watch_primary();
    let mut counted = 0;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            changed = primary.changed() => {
                if changed.is_err() {
                    // The watch task ended (it does only when the store goes): follow anew.
                    primary = store.watch_primary();
                    counted = 0;
                }
            }
            _ = tick.tick() => {}
        }
        let mut state = primary.borrow_and_update().clone();
        state.last_error = state.last_error.map(|e| redact(e, &cfg.endpoints));
        if state.errors > counted {
            if let Some(e) = &state.last_error {
                crate::metrics::store_errors(e.kind, state.errors - counted);
            }
            counted = state.errors;
        }
        events.send(report(connect.apply(state)));
    }
}

/// An error as pglb shows and logs it: an endpoint written with `user:password@` appears
/// without it.
fn redact(mut e: StoreFailure, endpoints: &[String]) -> StoreFailure {
    for endpoint in endpoints.iter().filter(|e| e.contains('@')) {
        e.message = e
            .message
            .replace(endpoint.as_str(), &without_credentials(endpoint));
    }
    e
}

/// Failed attempts to set up the client, added to what the primary watch reports.
#[derive(Default)]
struct Failures {
    count: u64,
    last: Option<StoreFailure>,
}

impl Failures {
    fn apply(&self, mut state: PrimaryState) -> PrimaryState {
        state.errors += self.count;
        if state.last_error.is_none() {
            state.last_error = self.last.clone();
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_show_credentials_written_into_an_endpoint() {
        let endpoints = ["http://pglb:s3cret@etcd-1:2379".to_string()];
        let e = StoreFailure {
            kind: "connect",
            message: "connect to etcd at http://pglb:s3cret@etcd-1:2379: refused".into(),
        };
        let e = redact(e, &endpoints);
        assert_eq!(e.message, "connect to etcd at http://etcd-1:2379: refused");
    }
}

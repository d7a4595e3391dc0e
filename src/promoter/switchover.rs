//! Planned switchover (`pglb-promoter switchover --to NAME`): make the primary read-only and
//! end its client sessions, wait until NAME has replayed the primary's final WAL position (read
//! again until it holds still), promote NAME and re-point the other replicas. Zero loss by
//! construction: nothing is promoted before it holds every byte the old primary wrote. The old
//! primary stays read-only on the older timeline (fenced) until `rejoin` makes it a replica. The
//! write outage is measured from the moment the old primary went read-only to the promotion and,
//! when pglb can be asked, to pglb routing writes to NAME.

use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::decide::{self, Primary, State};
use super::failover::{promote_and_follow, restore, FailoverError, Limits, Promotion};
use super::observe::{self, PglbView};
use super::promote::{ActError, Promoter};
use super::settings::{Member, Settings};
use crate::pg::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("no backend named {0:?} in the config")]
    UnknownTarget(String),
    #[error("no single primary answers: {0}")]
    NoPrimary(String),
    #[error("{0} is already the primary")]
    AlreadyPrimary(String),
    #[error("{name} cannot take over: {why}")]
    NotEligible { name: String, why: String },
    #[error("{target} did not replay the old primary's final WAL ({lsn}) within {after:?}; the old primary was made writable again")]
    NotCaughtUp {
        target: String,
        lsn: Lsn,
        after: Duration,
    },
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(transparent)]
    Promote(#[from] FailoverError),
    /// With a store: the leader ran the switchover and it failed.
    #[error("the leader {by} did not switch over: {error}")]
    Leader { by: String, error: String },
    /// With a store: no leader answered the request in time.
    #[error("no leader answered the switchover request within {0:?} (is a promoter leading?)")]
    NoAnswer(Duration),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a switchover did, printed as JSON by the CLI.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    pub from: String,
    pub to: String,
    pub final_lsn: String,
    pub timeline: u32,
    /// Old primary read-only → the target promoted.
    pub promoted_after_seconds: f64,
    /// Old primary read-only → pglb sends writes to the target (null without pglb).
    pub pglb_switched_after_seconds: Option<f64>,
    pub repointed: Vec<String>,
    pub repoint_failed: Vec<String>,
}

/// Runs a switchover to `to`; `timeout` bounds the wait for the target to catch up.
pub async fn run<P: Promoter>(
    p: &P,
    settings: &Settings,
    to: &str,
    timeout: Duration,
) -> Result<SwitchoverReport, SwitchoverError> {
    let target = settings
        .member(to)
        .cloned()
        .ok_or_else(|| SwitchoverError::UnknownTarget(to.to_string()))?;
    let obs = observe::observe(settings).await;
    let mut state = State::new(
        super::decide::Policy::new(settings.failover_after, settings.synchronous),
        obs.at,
    );
    state.note(&obs);
    let topo = decide::topology(&obs, &state);
    let primary = match topo.primary {
        Primary::One(p) => p,
        Primary::None => return Err(SwitchoverError::NoPrimary("none answers".into())),
        Primary::Many(ps) => {
            return Err(SwitchoverError::NoPrimary(format!(
                "several: {}",
                ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    if primary.name() == to {
        return Err(SwitchoverError::AlreadyPrimary(to.to_string()));
    }
    let not_eligible = |why: &str| SwitchoverError::NotEligible {
        name: to.to_string(),
        why: why.to_string(),
    };
    let t = obs.node(to).ok_or_else(|| not_eligible("not observed"))?;
    let target_timeline = t.reachable().map_or(0, |s| s.timeline);
    match t.reachable() {
        None => return Err(not_eligible("unreachable")),
        Some(s) if !s.in_recovery => return Err(not_eligible("not a replica")),
        Some(_) if target.no_failover => return Err(not_eligible("no_failover is set")),
        Some(_) if !decide::streams_from(t, primary) => {
            return Err(not_eligible("not streaming from the primary"))
        }
        Some(_) => {}
    }
    let old = primary.member.clone();
    let followers: Vec<_> = topo
        .replicas
        .iter()
        .filter(|r| r.name() != to)
        .map(|r| r.member.clone())
        .collect();
    // With a store: a new epoch of the journal, and only a valid leader gets further.
    p.begin_failover().await?;
    info!(step = "start", from = %old.name, to, followers = ?followers.iter().map(|m| &m.name).collect::<Vec<_>>(), "switchover");

    // 1. No more writes on the old primary.
    let started = Instant::now();
    let ended = p.fence(&old).await?;
    info!(step = "read_only", node = %old.name, terminated_sessions = ended, "switchover: old primary read-only, sessions ended");
    // A checkpoint now makes the last checkpoint the two servers share sit at the fork: the
    // later `rejoin` (pg_rewind) then needs only WAL the old primary still has, and copies little.
    if let Err(e) = p.checkpoint(&old).await {
        warn!(step = "checkpoint", node = %old.name, error = %e, "switchover: checkpoint on the old primary failed; rejoin may need more WAL");
    }

    // Hold the other replicas still, as a failover does: WAL the read-only primary still writes
    // in the background (a running-xacts record, the end of the checkpoint) after the final
    // position must not reach a replica unless the target has it too, or that replica ends up
    // ahead of the new timeline's fork and cannot follow the target. Their previous conninfo is
    // kept (on the server too), so a switchover that promotes nobody puts them back.
    let results = join_all(followers.iter().map(|m| p.stop_receiver(m))).await;
    let mut stopped = Vec::new();
    for (m, r) in followers.iter().zip(results) {
        match r {
            Ok(prev) => {
                info!(step = "stop_receiver", node = %m.name, "switchover: WAL receiver stopped");
                stopped.push((m.clone(), prev));
            }
            Err(e) => {
                warn!(step = "stop_receiver", node = %m.name, error = %e, "switchover: cannot stop the WAL receiver; if it receives past the final position it will need a rejoin")
            }
        }
    }
    let (final_lsn, promotion) = match catch_up_and_promote(
        p,
        settings,
        &old,
        &target,
        &followers,
        started,
        timeout,
        target_timeline,
    )
    .await
    {
        Ok(x) => x,
        Err(e) => {
            // Nobody was promoted: the other replicas follow the old primary again.
            restore(p, &stopped).await;
            return Err(e);
        }
    };

    // 4. Until every pglb that answers routes writes to the target.
    let mut pglb_after = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !settings.pglb_stats.is_empty() && Instant::now() < deadline {
        let views = join_all(settings.pglb_stats.iter().map(|addr| {
            observe::pglb_view(
                addr,
                settings.pglb_authorization.as_ref(),
                Duration::from_secs(2),
            )
        }))
        .await;
        let answering: Vec<&PglbView> = views
            .iter()
            .filter(|v| matches!(v, PglbView::Reachable { .. }))
            .collect();
        if !answering.is_empty()
            && answering
                .iter()
                .all(|v| v.sees_primary().as_deref() == Some(to))
        {
            pglb_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = SwitchoverReport {
        from: old.name.clone(),
        to: to.to_string(),
        final_lsn: final_lsn.to_string(),
        timeline: promotion.timeline,
        promoted_after_seconds: promotion.promoted_after.as_secs_f64(),
        pglb_switched_after_seconds: pglb_after.map(|d| d.as_secs_f64()),
        repointed: promotion.repointed.clone(),
        repoint_failed: promotion
            .repoint_failed
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect(),
    };
    info!(
        step = "done",
        from = %report.from,
        to = %report.to,
        final_lsn = %report.final_lsn,
        write_outage_s = report.pglb_switched_after_seconds.unwrap_or(report.promoted_after_seconds),
        "switchover done; the old primary stays read-only until `pglb-promoter rejoin`"
    );
    Ok(report)
}

/// With a store, `pglb-promoter switchover` does not act itself: it asks the leader (through
/// `{prefix}/switchover`), which runs the switchover with its guarded record, and waits for
/// its outcome (the report as JSON).
pub async fn request(
    cfg: &crate::config::StoreConfig,
    to: &str,
    timeout: Duration,
) -> Result<serde_json::Value, SwitchoverError> {
    use crate::store::{EtcdStore, Store, SwitchoverRequest};
    let store = EtcdStore::connect(cfg).await?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    store
        .request_switchover(&SwitchoverRequest {
            id: id.clone(),
            to: to.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        })
        .await?;
    info!(to, request = %id, "switchover requested from the leader");
    let wait = timeout + Duration::from_secs(60);
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(Some(o)) = store.switchover_outcome().await {
            if o.id == id {
                return match (o.report, o.error) {
                    (Some(r), _) => Ok(r),
                    (None, e) => Err(SwitchoverError::Leader {
                        by: o.by,
                        error: e.unwrap_or_default(),
                    }),
                };
            }
        }
        if Instant::now() >= deadline {
            return Err(SwitchoverError::NoAnswer(wait));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Steps 2 and 3 of a switchover: the target replays the old primary's final WAL position (read
/// again until it holds still), then is promoted and the others re-pointed. An error means
/// nobody was promoted (the old primary was made writable again when the target did not catch
/// up).
#[allow(clippy::too_many_arguments)]
async fn catch_up_and_promote<P: Promoter>(
    p: &P,
    settings: &Settings,
    old: &Member,
    target: &Member,
    followers: &[Member],
    started: Instant,
    timeout: Duration,
    target_timeline: u32,
) -> Result<(Lsn, Promotion), SwitchoverError> {
    let to = target.name.as_str();
    // 2. The target must hold the final WAL position, read again until it holds still.
    let deadline = started + timeout;
    // Every client session ended before the first read, so every commit is at or before it;
    // WAL that still moves after it comes from background work, and a few rounds suffice.
    let mut final_lsn = Lsn::default();
    for round in 0..5 {
        let lsn = p.position(old).await?.current_lsn.unwrap_or_default();
        let caught_up = loop {
            match p.position(target).await {
                Ok(q) if q.replay_lsn.unwrap_or_default() >= lsn => break true,
                _ if Instant::now() >= deadline => break false,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        if !caught_up {
            warn!(step = "catch_up", node = to, lsn = %lsn, "switchover: target did not catch up; undoing read-only");
            if let Err(e) = p.unfence(old).await {
                warn!(step = "undo", node = %old.name, error = %e, "cannot make the old primary writable again");
            }
            return Err(SwitchoverError::NotCaughtUp {
                target: to.to_string(),
                lsn,
                after: timeout,
            });
        }
        final_lsn = lsn;
        let again = p.position(old).await?.current_lsn.unwrap_or_default();
        if again == lsn {
            break;
        }
        info!(step = "catch_up", round, lsn = %lsn, now = %again, "switchover: WAL still moving on the read-only primary (background work)");
    }
    info!(step = "catch_up", node = to, lsn = %final_lsn, after_s = started.elapsed().as_secs_f64(), "switchover: target replayed the final WAL position");

    // 3. Promote and re-point.
    let promotion = promote_and_follow(
        p,
        target,
        followers,
        &settings.members,
        settings.synchronous,
        &Limits::default(),
        started,
        final_lsn,
        target_timeline,
    )
    .await?;

    Ok((final_lsn, promotion))
}

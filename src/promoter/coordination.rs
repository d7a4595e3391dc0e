//! Several promoters through the store (`[store] kind = "etcd"`): this promoter's campaign for
//! the leader key, the gate that lets only a valid leader change servers (`Guarded`, a
//! `Promoter` around the real one), the guarded record of the primary before every promotion,
//! the journal of failover steps, and what `/status` shows of the store. Without a store
//! (`Link` absent) `Guarded` passes everything through: one promoter, as before.
//!
//! The decisions stay in `decide`; this module only holds the leadership and writes to the store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::decide::parse_conninfo;
use super::http::Shared;
use super::metrics;
use super::observe::Observation;
use super::promote::{ActError, Position, Promoter};
use super::settings::Member;
use crate::config::{StoreConfig, StoreKind};
use crate::store::{
    Campaign, EtcdStore, FailoverStep, Leadership, MemberView, PrimaryRecord, PrimaryState,
    StepAction, Store, StoreError, SwitchoverOutcome,
};

/// This promoter's place among the others: its id, the store, its campaign.
pub struct Link {
    pub id: String,
    pub store: EtcdStore,
    leadership: watch::Receiver<Leadership>,
    primary: watch::Receiver<PrimaryState>,
    /// Epoch and next sequence number of the journal.
    journal: Mutex<(u64, u32)>,
    publishing: AtomicBool,
    campaign: Mutex<Option<Campaign>>,
    switchover_checked: Mutex<Option<tokio::time::Instant>>,
    /// The journal may hold steps of a failover that has since converged.
    journal_dirty: AtomicBool,
    /// Other promoters' views: id → (their look counter, when we saw it move, the primary
    /// they see).
    peers: Mutex<std::collections::HashMap<String, PeerSeen>>,
    /// This promoter's last committed record and its revision.
    written: Mutex<Option<(PrimaryRecord, i64)>>,
}

/// Another promoter's view as last read: its look counter, when we saw it move, its primary.
type PeerSeen = (u64, tokio::time::Instant, Option<String>);

impl Link {
    /// Connects to the store and starts campaigning as `id`.
    pub async fn start(store: EtcdStore, id: &str) -> Result<Arc<Link>, StoreError> {
        let campaign = store.campaign(id).await?;
        Ok(Arc::new(Link {
            id: id.to_string(),
            leadership: campaign.leadership(),
            primary: store.watch_primary(),
            store,
            journal: Mutex::new((0, 0)),
            publishing: AtomicBool::new(false),
            campaign: Mutex::new(Some(campaign)),
            switchover_checked: Mutex::new(None),
            journal_dirty: AtomicBool::new(true),
            peers: Mutex::new(std::collections::HashMap::new()),
            written: Mutex::new(None),
        }))
    }

    /// Gives the leader key up at once (on shutdown), so another promoter need not wait out
    /// the lease.
    pub async fn resign(&self, timeout: Duration) {
        let campaign = self
            .campaign
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(c) = campaign {
            c.resign(timeout).await;
        }
    }

    /// The standing right now.
    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    /// Whether this promoter may change servers at this instant.
    pub fn is_leader(&self) -> bool {
        self.leadership.borrow().is_leader()
    }

    /// The recorded primary as last seen (watched).
    pub fn recorded(&self) -> PrimaryState {
        self.primary.borrow().clone()
    }

    /// The newest record known here: the watched one, or this promoter's own last write when
    /// the watch has not caught up with it yet.
    pub fn current_record(&self) -> Option<PrimaryRecord> {
        let watched = self.recorded();
        let written = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match written {
            Some((r, rev)) if rev > watched.revision => Some(r),
            _ => watched.record,
        }
    }

    /// The valid leadership, or why not.
    fn acting(&self, node: &str, what: &'static str) -> Result<Leadership, ActError> {
        let l = self.leadership();
        if l.is_leader() {
            Ok(l)
        } else {
            metrics::guard_refused("not_leader");
            Err(ActError::NotLeader {
                node: node.to_string(),
                what,
                holder: l.leader_id().map(str::to_string),
            })
        }
    }

    fn store_error(node: &str, what: &'static str, e: StoreError) -> ActError {
        metrics::store_error(e.kind());
        match e {
            StoreError::NotLeader { holder } => {
                metrics::guard_refused("not_leader");
                ActError::NotLeader {
                    node: node.to_string(),
                    what,
                    holder,
                }
            }
            e => {
                metrics::guard_refused(e.kind());
                ActError::Store {
                    node: node.to_string(),
                    what,
                    kind: e.kind(),
                    message: error_chain(&e),
                }
            }
        }
    }

    /// Journals `action` under the current epoch, guarded by the leader key.
    async fn journal(&self, action: StepAction) -> Result<(), ActError> {
        let node = action.server().to_string();
        let what = action.as_str();
        let leadership = self.acting(&node, what)?;
        let (epoch, seq) = {
            let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            j.1 += 1;
            (j.0, j.1 - 1)
        };
        let step = FailoverStep {
            epoch,
            seq,
            by: self.id.clone(),
            action,
        };
        self.store
            .record_step(&leadership, &step)
            .await
            .map(|_| ())
            .map_err(|e| Self::store_error(&node, what, e))
    }

    /// Starts the journal of a new failover: epoch = the recorded one + 1.
    async fn begin_failover(&self) -> Result<u64, ActError> {
        self.acting("-", "begin failover")?;
        let rec = self
            .store
            .primary()
            .await
            .map_err(|e| Self::store_error("-", "read the recorded primary", e))?;
        let epoch = rec.map_or(0, |r| r.epoch) + 1;
        *self.journal.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, 0);
        self.journal_dirty.store(true, Ordering::Release);
        Ok(epoch)
    }

    fn epoch(&self) -> u64 {
        self.journal.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Records `record`, guarded by the leader key.
    pub async fn record(&self, record: &PrimaryRecord) -> Result<(), ActError> {
        let leadership = self.acting(&record.name, "record primary")?;
        match self.store.record_primary(&leadership, record).await {
            Ok(revision) => {
                *self.written.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((record.clone(), revision));
                Ok(())
            }
            Err(e) => {
                let e = Self::store_error(&record.name, "record primary", e);
                warn!(primary = %record.name, error = %e, "guarded record of the primary failed");
                Err(e)
            }
        }
    }

    /// Leader's housekeeping of the record after a look that found `primary` writable on
    /// `timeline` (the only writable server on the newest timeline):
    /// - the first leader, finding no record, records it;
    /// - a record naming it on an older timeline (a promotion whose promoter died before
    ///   recording the new timeline) is brought up to date;
    /// - a record naming another server that is reachable, still in recovery and on no newer
    ///   timeline than recorded was never promoted (its promoter died between the record and
    ///   `pg_promote`, and the old primary is back): the failover is undone in the record, under
    ///   the next epoch.
    ///
    /// Any other record naming another server is left alone: only a failover or a switchover
    /// changes who is recorded.
    pub async fn keep_record(&self, obs: &Observation, primary: &str, timeline: u32) {
        if !self.is_leader() {
            return;
        }
        let never_promoted = |r: &PrimaryRecord| {
            r.name != primary
                && obs
                    .node(&r.name)
                    .and_then(|n| n.reachable())
                    .is_some_and(|s| s.in_recovery && s.timeline <= r.timeline)
        };
        let due = match &self.recorded().record {
            None => true,
            Some(r) => (r.name == primary && r.timeline < timeline) || never_promoted(r),
        };
        if !due {
            return;
        }
        // Confirm with a linearizable read before writing.
        let current = match self.store.primary().await {
            Ok(r) => r,
            Err(e) => {
                metrics::store_error(e.kind());
                return;
            }
        };
        let record = match current {
            None => PrimaryRecord {
                name: primary.to_string(),
                timeline,
                epoch: 1,
            },
            Some(r) if r.name == primary && r.timeline < timeline => {
                PrimaryRecord { timeline, ..r }
            }
            Some(r) if never_promoted(&r) => {
                warn!(recorded = %r.name, epoch = r.epoch, primary, "the recorded primary was never promoted and another is writable: recording it instead");
                PrimaryRecord {
                    name: primary.to_string(),
                    timeline,
                    epoch: r.epoch + 1,
                }
            }
            Some(_) => return,
        };
        let _ = self.record(&record).await;
    }

    /// The leader, once the cluster is settled on the recorded `primary` (steady, every replica
    /// streaming from it), forgets the journal of the failovers behind it.
    pub async fn settled(&self, primary: &str, timeline: u32) {
        if !self.is_leader() || !self.journal_dirty.load(Ordering::Acquire) {
            return;
        }
        let rec = self.recorded();
        let Some(r) = rec
            .record
            .filter(|r| r.name == primary && r.timeline == timeline)
        else {
            return;
        };
        let steps = match self.store.steps().await {
            Ok(s) => s,
            Err(e) => {
                metrics::store_error(e.kind());
                return;
            }
        };
        let upto = steps
            .iter()
            .map(|s| s.epoch)
            .max()
            .unwrap_or(0)
            .max(r.epoch);
        if !steps.is_empty() {
            if let Err(e) = self.store.clear_steps(&self.leadership(), upto).await {
                metrics::store_error(e.kind());
                return;
            }
            info!(
                steps = steps.len(),
                epoch = upto,
                primary,
                "failover converged: journal cleared"
            );
        }
        self.journal_dirty.store(false, Ordering::Release);
    }

    /// The leader runs a pending switchover request (checked at most once a second) through
    /// `actor`, and stores its outcome. Returns whether one ran.
    pub async fn serve_switchover<P: Promoter>(
        &self,
        actor: &P,
        settings: &super::settings::Settings,
    ) -> bool {
        if !self.is_leader() {
            return false;
        }
        {
            let mut last = self
                .switchover_checked
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *last = Some(tokio::time::Instant::now());
        }
        let request = match self.store.switchover_request().await {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(e) => {
                metrics::store_error(e.kind());
                return false;
            }
        };
        info!(to = %request.to, request = %request.id, "switchover requested through the store");
        let timeout = Duration::from_millis(request.timeout_ms);
        let result = super::switchover::run(actor, settings, &request.to, timeout).await;
        let outcome = match result {
            Ok(report) => SwitchoverOutcome {
                id: request.id,
                by: self.id.clone(),
                report: serde_json::to_value(&report).ok(),
                error: None,
            },
            Err(e) => {
                warn!(error = %e, "requested switchover failed");
                SwitchoverOutcome {
                    id: request.id,
                    by: self.id.clone(),
                    report: None,
                    error: Some(e.to_string()),
                }
            }
        };
        let leadership = self.leadership();
        if let Err(e) = self.store.finish_switchover(&leadership, &outcome).await {
            metrics::store_error(e.kind());
            warn!(error = %e, "switchover outcome not stored");
        }
        true
    }

    /// The other promoters whose view moved within `max_age` and names a primary.
    pub fn witnesses(&self, max_age: Duration) -> Vec<(String, String)> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, String)> = peers
            .iter()
            .filter(|(_, (_, moved, _))| moved.elapsed() <= max_age)
            .filter_map(|(id, (_, _, p))| p.clone().map(|p| (id.clone(), p)))
            .collect();
        out.sort();
        out
    }

    fn note_peers(&self, members: &[crate::store::Member]) {
        let now = tokio::time::Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.retain(|id, _| members.iter().any(|m| &m.id == id));
        for m in members.iter().filter(|m| m.id != self.id) {
            let e =
                peers
                    .entry(m.id.clone())
                    .or_insert((m.view.looks, now, m.view.primary.clone()));
            if e.0 != m.view.looks {
                *e = (m.view.looks, now, m.view.primary.clone());
            }
        }
    }

    /// Publishes this promoter's view under its member lease, beside the loop (at most one
    /// publish in flight).
    pub fn publish(self: &Arc<Self>, view: MemberView) {
        if self.publishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move {
            if let Err(e) = link.store.publish_member(&link.id, &view).await {
                metrics::store_error(e.kind());
                tracing::debug!(error = %e, "member view not published");
            }
            link.publishing.store(false, Ordering::Release);
        });
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `conninfo` without its password (the store is no place for secrets).
pub fn without_password(conninfo: &str) -> String {
    parse_conninfo(conninfo)
        .into_iter()
        .filter(|(k, _)| k != "password")
        .map(|(k, v)| {
            if v.is_empty() || v.contains([' ', '\'', '\\']) {
                format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The gate: every change to a server goes through here. Without a store it is the inner
/// promoter. With one, each change is refused unless this promoter holds a valid leadership
/// at that instant, and each step of a failover is journaled (guarded by the leader key)
/// before it is taken; the promotion itself waits for the guarded record of the new primary.
#[derive(Clone)]
pub struct Guarded<P> {
    inner: P,
    link: Option<Arc<Link>>,
}

impl<P> Guarded<P> {
    pub fn new(inner: P, link: Option<Arc<Link>>) -> Self {
        Guarded { inner, link }
    }

    fn gate(&self, node: &Member, what: &'static str) -> Result<(), ActError> {
        match &self.link {
            Some(l) => l.acting(&node.name, what).map(|_| ()),
            None => Ok(()),
        }
    }
}

impl<P: Promoter> Promoter for Guarded<P> {
    async fn position(&self, node: &Member) -> Result<Position, ActError> {
        self.inner.position(node).await
    }

    async fn receiver_conninfo(&self, node: &Member) -> Result<String, ActError> {
        self.inner.receiver_conninfo(node).await
    }

    async fn begin_failover(&self) -> Result<(), ActError> {
        match &self.link {
            Some(l) => {
                let epoch = l.begin_failover().await?;
                info!(epoch, "failover journal opened");
                Ok(())
            }
            None => self.inner.begin_failover().await,
        }
    }

    async fn stop_receiver(&self, node: &Member) -> Result<String, ActError> {
        if let Some(l) = &self.link {
            let old = self.inner.receiver_conninfo(node).await?;
            l.journal(StepAction::ReceiversStopped {
                server: node.name.clone(),
                old_primary_conninfo: without_password(&old),
            })
            .await?;
        }
        self.inner.stop_receiver(node).await
    }

    async fn restore_receiver(&self, node: &Member, conninfo: &str) -> Result<(), ActError> {
        self.gate(node, "restore wal receiver")?;
        self.inner.restore_receiver(node, conninfo).await
    }

    async fn prepare(&self, node: &Member, sync_names: Option<&str>) -> Result<(), ActError> {
        self.gate(node, "prepare candidate")?;
        self.inner.prepare(node, sync_names).await
    }

    async fn guard_promotion(&self, node: &Member, from_timeline: u32) -> Result<(), ActError> {
        let Some(l) = &self.link else {
            return self.inner.guard_promotion(node, from_timeline).await;
        };
        l.record(&PrimaryRecord {
            name: node.name.clone(),
            timeline: from_timeline,
            epoch: l.epoch(),
        })
        .await?;
        l.journal(StepAction::Promoted {
            server: node.name.clone(),
            from_timeline,
        })
        .await
    }

    async fn promote(&self, node: &Member, wait: Duration) -> Result<bool, ActError> {
        self.gate(node, "pg_promote")?;
        self.inner.promote(node, wait).await
    }

    async fn promoted(&self, node: &Member, timeline: u32) -> Result<(), ActError> {
        match &self.link {
            Some(l) => {
                l.record(&PrimaryRecord {
                    name: node.name.clone(),
                    timeline,
                    epoch: l.epoch(),
                })
                .await
            }
            None => self.inner.promoted(node, timeline).await,
        }
    }

    async fn checkpoint(&self, node: &Member) -> Result<(), ActError> {
        self.gate(node, "checkpoint")?;
        self.inner.checkpoint(node).await
    }

    async fn ensure_slot(&self, primary: &Member, slot: &str) -> Result<(), ActError> {
        self.gate(primary, "create replication slot")?;
        self.inner.ensure_slot(primary, slot).await
    }

    async fn repoint(&self, replica: &Member, primary: &Member) -> Result<(), ActError> {
        if let Some(l) = &self.link {
            l.journal(StepAction::Repointed {
                server: replica.name.clone(),
                to: primary.name.clone(),
            })
            .await?;
        }
        self.inner.repoint(replica, primary).await
    }

    async fn fence(&self, node: &Member) -> Result<u64, ActError> {
        if let Some(l) = &self.link {
            l.journal(StepAction::Fenced {
                server: node.name.clone(),
                reason: "read_only".to_string(),
            })
            .await?;
        }
        self.inner.fence(node).await
    }

    async fn unfence(&self, node: &Member) -> Result<(), ActError> {
        self.gate(node, "unfence")?;
        self.inner.unfence(node).await
    }

    async fn set_sync_names(&self, primary: &Member, value: &str) -> Result<(), ActError> {
        self.gate(primary, "set synchronous_standby_names")?;
        self.inner.set_sync_names(primary, value).await
    }
}

/// Where this promoter stands towards the store, as the `[store]` in effect makes it; the loop
/// reads it at every look.
#[derive(Clone)]
pub enum Standing {
    /// No store: this promoter acts alone.
    Alone,
    /// Campaigning in the store: it acts only while it leads.
    Linked(Arc<Link>),
    /// Between two `[store]` settings: the old leadership given up, the new store not set up
    /// yet. It acts not at all.
    Switching,
}

impl Standing {
    /// Sets up what `cfg` asks for: nothing, or the store client and the campaign as `id`.
    pub async fn start(cfg: &StoreConfig, id: &str) -> Result<Standing, StoreError> {
        match cfg.kind {
            StoreKind::None => Ok(Standing::Alone),
            StoreKind::Etcd => {
                let store = EtcdStore::connect(cfg).await?;
                let link = Link::start(store, id).await?;
                info!(id = %id, endpoints = %cfg.endpoints.iter().map(|e| crate::routing::without_credentials(e)).collect::<Vec<_>>().join(","), prefix = %cfg.prefix, lease_ttl = ?cfg.lease_ttl, "store: campaigning; only the leader changes servers");
                Ok(Standing::Linked(link))
            }
        }
    }

    pub fn link(&self) -> Option<Arc<Link>> {
        match self {
            Standing::Linked(l) => Some(l.clone()),
            Standing::Alone | Standing::Switching => None,
        }
    }

    /// Whether the loop may act at this instant.
    pub fn may_act(&self) -> bool {
        match self {
            Standing::Alone => true,
            Standing::Linked(l) => l.is_leader(),
            Standing::Switching => false,
        }
    }
}

/// Applies reloaded `[store]` settings until `stop`: on a change, the loop stops acting
/// (`Switching`), the old leadership is resigned under the old settings (its key deleted, its
/// lease revoked), then the new store is set up (retried every second while it cannot be) and
/// campaigned in; the promoter acts again only as `Alone`, or once it leads in the new store.
/// Also runs `follow` (the `/status` store section) for the link in effect.
pub async fn on_reload(
    mut settings: watch::Receiver<StoreConfig>,
    standing: watch::Sender<Standing>,
    id: String,
    shared: Arc<Shared>,
    every: Duration,
    stop: CancellationToken,
) {
    let status = |link: Option<Arc<Link>>| {
        link.map(|l| {
            let token = stop.child_token();
            tokio::spawn(follow(l, shared.clone(), every, token.clone()));
            token
        })
    };
    let mut following = status(standing.borrow().link());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = settings.changed() => if changed.is_err() {
                // No more reloads: the standing stays as it is.
                stop.cancelled().await;
                return;
            },
        }
        let old = standing.send_replace(Standing::Switching);
        if let Some(t) = following.take() {
            t.cancel();
        }
        if let Some(l) = old.link() {
            info!(id = %id, "[store] changed: giving up the leadership under the old settings");
            l.resign(Duration::from_secs(2)).await;
        }
        shared.update(|st| st.store = None);
        metrics::leader(false);
        let mut failed = 0u64;
        let new = loop {
            let cfg = settings.borrow_and_update().clone();
            match Standing::start(&cfg, &id).await {
                Ok(s) => break s,
                Err(e) => {
                    metrics::store_error(e.kind());
                    if failed == 0 {
                        warn!(error = %error_chain(&e), "cannot set up the reloaded store; retrying every second (no server changes until then)");
                    }
                    failed += 1;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        if matches!(new, Standing::Alone) {
            info!(id = %id, "[store] removed: this promoter acts alone");
        }
        following = status(new.link());
        standing.send_replace(new);
    }
}

/// What `/status` shows of the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreStatus {
    /// `none` or `etcd`.
    pub kind: String,
    /// Whether the store answered lately.
    pub reachable: bool,
    /// The leader's id as this promoter knows it (null: nobody, or unknown).
    pub leader: Option<String>,
    /// Whether this promoter is the leader and may act now.
    pub is_leader: bool,
    /// The recorded primary.
    pub record: Option<PrimaryRecord>,
    /// Every published promoter view, with the age of its lease.
    pub members: Vec<MemberStatus>,
    /// The last store error, if the last request failed.
    pub error: Option<String>,
}

/// One published promoter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: String,
    pub lease_age_seconds: Option<f64>,
    pub view: MemberView,
}

/// Follows the leadership and the store for `/status` and the metrics until `stop`.
pub async fn follow(
    link: Arc<Link>,
    shared: Arc<Shared>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut leadership = link.leadership.clone();
    let mut was_leader: Option<bool> = None;
    loop {
        let l = leadership.borrow_and_update().clone();
        let leading = matches!(l, Leadership::Leader(_));
        if was_leader != Some(leading) {
            if was_leader.is_some() {
                metrics::leadership_change(leading);
            }
            if leading {
                info!(id = %link.id, "leading: this promoter acts");
            } else {
                info!(id = %link.id, leader = l.leader_id().unwrap_or("none"), "following: this promoter observes only");
            }
            metrics::leader(leading);
            was_leader = Some(leading);
        }
        let members = link.store.members().await;
        if let Ok(ms) = &members {
            link.note_peers(ms);
        }
        let rec = link.recorded();
        shared.update(|st| {
            let s = st.store.get_or_insert_with(StoreStatus::default);
            s.kind = "etcd".to_string();
            s.leader = l.leader_id().map(str::to_string);
            s.is_leader = l.is_leader();
            s.record = rec.record.clone();
            match &members {
                Ok(ms) => {
                    s.reachable = true;
                    s.error = None;
                    s.members = ms
                        .iter()
                        .map(|m| MemberStatus {
                            id: m.id.clone(),
                            lease_age_seconds: m.lease_age.map(|d| d.as_secs_f64()),
                            view: m.view.clone(),
                        })
                        .collect();
                }
                Err(e) => {
                    s.reachable = false;
                    s.error = Some(error_chain(e));
                }
            }
        });
        if let Err(e) = &members {
            metrics::store_error(e.kind());
        }
        metrics::store_reachable(members.is_ok());
        tokio::select! {
            _ = stop.cancelled() => return,
            r = leadership.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(every) => {}
        }
    }
}

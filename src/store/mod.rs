//! The consensus store that coordinates several promoters, behind the small `Store` trait:
//! leader election on a leased key, each promoter's published view, the recorded primary (written
//! only by a transaction guarded by the leader key) and the journal of failover steps that lets the
//! next leader finish or undo a failover. `etcd` implements it with etcd's v3 API; a Kubernetes
//! Lease backend can implement the same trait later.
//!
//! This module owns the keys and their meaning, not the decisions: when to fail over, what to
//! record and how pglb routes on the record belong to `promoter` and `routing`.
//!
//! Keys, under `[store] prefix` (default "/pglb/main"):
//! - `{prefix}/leader`: the leader's id, under the leader's lease (created only if absent).
//! - `{prefix}/members/{id}`: each promoter's `MemberView` (JSON), under its own lease.
//! - `{prefix}/primary`: the `PrimaryRecord` (JSON).
//! - `{prefix}/steps/{epoch:020}-{seq:06}`: the `FailoverStep` journal (JSON).
//! - `{prefix}/switchover`: a `SwitchoverRequest` for the leader (JSON); and
//!   `{prefix}/switchover_outcome`: the leader's `SwitchoverOutcome` (JSON).

mod error;
pub mod etcd;
pub mod lease;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{StoreConfig, StoreKind};
pub use error::StoreError;
pub use etcd::EtcdStore;

/// The store `[store]` configures: `None` for kind "none" (one promoter, nothing shared).
pub async fn from_config(cfg: &StoreConfig) -> Result<Option<EtcdStore>, StoreError> {
    match cfg.kind {
        StoreKind::None => Ok(None),
        StoreKind::Etcd => EtcdStore::connect(cfg).await.map(Some),
    }
}

/// A consensus store for promoters. Every write that changes the cluster (`record_primary`,
/// `record_step`, `clear_steps`) takes the caller's `Leadership` and commits only while the
/// leader key is still the one that leadership won; otherwise it fails with
/// `StoreError::NotLeader` and writes nothing.
pub trait Store: Send + Sync + 'static {
    /// Starts campaigning for the leader key as `id` and keeps doing so (renewing while leading,
    /// waiting for the key to go while following) until the `Campaign` is resigned or dropped.
    fn campaign(&self, id: &str) -> impl Future<Output = Result<Campaign, StoreError>> + Send;

    /// Who holds the leader key now, read from the store.
    fn leader(&self) -> impl Future<Output = Result<Option<LeaderKey>, StoreError>> + Send;

    /// Publishes (replaces) this promoter's view under its own lease, which the store keeps alive
    /// while it lives; the key disappears within the lease TTL after the promoter dies.
    fn publish_member(
        &self,
        id: &str,
        view: &MemberView,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every published member view, with the age of its lease, sorted by id.
    fn members(&self) -> impl Future<Output = Result<Vec<Member>, StoreError>> + Send;

    /// Records the primary, only while `leadership` still holds the leader key. Returns the store
    /// revision of the commit.
    fn record_primary(
        &self,
        leadership: &Leadership,
        record: &PrimaryRecord,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// The recorded primary, read from the store (a linearizable read).
    fn primary(&self) -> impl Future<Output = Result<Option<PrimaryRecord>, StoreError>> + Send;

    /// Follows the recorded primary: the receiver always holds the latest record seen, whether
    /// the store answered lately and its failed reads. Runs until every receiver is dropped or the store is.
    fn watch_primary(&self) -> watch::Receiver<PrimaryState>;

    /// Journals a failover step before it is taken, guarded like `record_primary`. Recording the
    /// same `(epoch, seq)` again replaces it (a retry after an unknown outcome is safe).
    fn record_step(
        &self,
        leadership: &Leadership,
        step: &FailoverStep,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// The journal, oldest first (by epoch, then seq).
    fn steps(&self) -> impl Future<Output = Result<Vec<FailoverStep>, StoreError>> + Send;

    /// Forgets the journal of every failover up to and including `epoch`, once it has converged;
    /// guarded like `record_primary`.
    fn clear_steps(
        &self,
        leadership: &Leadership,
        epoch: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Asks the leader for a planned switchover (replaces an earlier request).
    fn request_switchover(
        &self,
        request: &SwitchoverRequest,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The pending switchover request, if any.
    fn switchover_request(
        &self,
    ) -> impl Future<Output = Result<Option<SwitchoverRequest>, StoreError>> + Send;

    /// The leader's answer to a request: removes the request and stores `outcome`, guarded
    /// like `record_primary`.
    fn finish_switchover(
        &self,
        leadership: &Leadership,
        outcome: &SwitchoverOutcome,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The last switchover outcome.
    fn switchover_outcome(
        &self,
    ) -> impl Future<Output = Result<Option<SwitchoverOutcome>, StoreError>> + Send;
}

/// A planned switchover asked of the leader (`pglb-promoter switchover` with a store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    /// Unique per request: the outcome names it.
    pub id: String,
    /// Backend to promote.
    pub to: String,
    /// Bound on the target's catch-up, in milliseconds.
    pub timeout_ms: u64,
}

/// What the leader made of a `SwitchoverRequest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchoverOutcome {
    /// The request's id.
    pub id: String,
    /// The leader that ran it.
    pub by: String,
    /// The report (`promoter::switchover::SwitchoverReport` as JSON) when it succeeded.
    pub report: Option<serde_json::Value>,
    /// Why it did not, otherwise.
    pub error: Option<String>,
}

/// This promoter's standing, as published by its `Campaign`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Not leading. `leader` is the holder of the leader key as last seen (`None`: nobody, or
    /// unknown because the store did not answer).
    Follower { leader: Option<String> },
    /// Leading the term that created the leader key at `term.revision`.
    Leader(LeaderTerm),
}

impl Leadership {
    /// The term, if this is a leader whose lease is still valid right now. Check it immediately
    /// before every action: a published `Leader` value may be about to lapse.
    pub fn valid_term(&self) -> Option<&LeaderTerm> {
        match self {
            Leadership::Leader(t) if t.is_valid() => Some(t),
            _ => None,
        }
    }

    /// Whether this promoter may act right now.
    pub fn is_leader(&self) -> bool {
        self.valid_term().is_some()
    }

    /// The leader's id as far as this promoter knows.
    pub fn leader_id(&self) -> Option<&str> {
        match self {
            Leadership::Leader(t) => Some(&t.id),
            Leadership::Follower { leader } => leader.as_deref(),
        }
    }
}

/// One leadership term: the leader key `{prefix}/leader` = `id`, created at store revision
/// `revision` under lease `lease`. Guarded writes compare on `revision` and `id`.
#[derive(Clone)]
pub struct LeaderTerm {
    pub id: String,
    /// The leader key's create revision: unique to this term.
    pub revision: i64,
    /// The store's lease id (etcd: the lease the key is attached to).
    pub lease: i64,
    /// Until when the term may act, moved forward by each confirmed renewal (see `lease`).
    valid_until: Arc<Mutex<Instant>>,
}

impl LeaderTerm {
    pub(crate) fn new(id: String, revision: i64, lease: i64, valid_until: Instant) -> Self {
        LeaderTerm {
            id,
            revision,
            lease,
            valid_until: Arc::new(Mutex::new(valid_until)),
        }
    }

    /// Until when this term may act, on this process's monotonic clock.
    pub fn valid_until(&self) -> Instant {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether this term may still act right now.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until()
    }

    /// Moves the validity end (only the campaign task does this).
    pub(crate) fn set_valid_until(&self, until: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = until;
    }
}

impl PartialEq for LeaderTerm {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.revision == other.revision && self.lease == other.lease
    }
}
impl Eq for LeaderTerm {}

impl fmt::Debug for LeaderTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderTerm")
            .field("id", &self.id)
            .field("revision", &self.revision)
            .field("lease", &self.lease)
            .field(
                "valid_for",
                &self.valid_until().saturating_duration_since(Instant::now()),
            )
            .finish()
    }
}

/// The leader key as read from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaderKey {
    pub id: String,
    pub revision: i64,
    pub lease: i64,
}

/// A running campaign. `leadership()` follows its standing. `resign()` gives the key up at once;
/// dropping the campaign only stops it (the lease then expires within its TTL, as if the process
/// had died).
pub struct Campaign {
    leadership: watch::Receiver<Leadership>,
    resign: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Campaign {
    pub(crate) fn new(
        leadership: watch::Receiver<Leadership>,
        resign: oneshot::Sender<()>,
        task: JoinHandle<()>,
    ) -> Self {
        Campaign {
            leadership,
            resign: Some(resign),
            task: Some(task),
        }
    }

    /// The standing, updated on every change (won, lost, lapsed, new leader seen).
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// The standing right now.
    pub fn current(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    /// Steps down and deletes the leader key (revokes the lease), waiting at most `timeout`.
    pub async fn resign(mut self, timeout: Duration) {
        if let Some(tx) = self.resign.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(timeout, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Campaign {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What one promoter sees, published for the others (witnesses) and the status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The server this promoter finds writable, if any.
    #[serde(default)]
    pub primary: Option<String>,
    /// Its timeline, when known.
    #[serde(default)]
    pub timeline: Option<u32>,
    /// Servers it can log into.
    #[serde(default)]
    pub reachable: Vec<String>,
    /// Servers it cannot reach or log into.
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// How many looks it has taken: a counter that stops moving marks a stale view.
    #[serde(default)]
    pub looks: u64,
}

/// A published member view as read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: String,
    pub view: MemberView,
    /// Time since the member last renewed its lease (whole seconds: etcd's granularity); `None`
    /// when the lease is already gone.
    pub lease_age: Option<Duration>,
}

/// The recorded primary: the only server pglb may send writes to (when a store is configured).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRecord {
    /// Backend name from `[[backend]]`.
    pub name: String,
    /// Its timeline once promoted; before promotion, the timeline it is expected to exceed.
    pub timeline: u32,
    /// Failover counter: each promotion or switchover records the next epoch.
    pub epoch: u64,
}

/// The recorded primary as followed by `Store::watch_primary`. The default (before the first
/// answer) is no record, unreachable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrimaryState {
    /// The latest record seen (kept while the store is unreachable).
    pub record: Option<PrimaryRecord>,
    /// Store revision of that record (its mod revision; 0 = never seen one).
    pub revision: i64,
    /// Whether the store answered within the last check.
    pub reachable: bool,
    /// When the store last answered (`None`: never).
    pub last_contact: Option<Instant>,
    /// Failed reads since the follower started.
    pub errors: u64,
    /// The last failed read (kept after the store answers again).
    pub last_error: Option<StoreFailure>,
}

/// A failed store request as a follower reports it: `StoreError` itself does not clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    /// `StoreError::kind()`: a stable label for metrics.
    pub kind: &'static str,
    /// The error with its causes, for people.
    pub message: String,
}

impl From<&StoreError> for StoreFailure {
    fn from(e: &StoreError) -> Self {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        StoreFailure {
            kind: e.kind(),
            message,
        }
    }
}

/// One journalled step of a failover, recorded before it is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverStep {
    /// The failover this belongs to: the epoch its `PrimaryRecord` has (or will have).
    pub epoch: u64,
    /// Order within the failover, chosen by the leader (0, 1, 2, ...).
    pub seq: u32,
    /// The promoter that recorded it.
    pub by: String,
    pub action: StepAction,
}

/// What a failover step does to a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum StepAction {
    /// The WAL receiver of `server` is stopped; `old_primary_conninfo` is what it followed, so
    /// that it can be restored. Record it without a password: the promoter adds its own
    /// replication password back (the store is not a place for secrets).
    ReceiversStopped {
        server: String,
        old_primary_conninfo: String,
    },
    /// `server` is (being) promoted; `from_timeline` is the timeline it was replaying.
    Promoted { server: String, from_timeline: u32 },
    /// `server` is re-pointed to follow `to`.
    Repointed { server: String, to: String },
    /// `server` is fenced (made read-only / kept from writes) for `reason`.
    Fenced { server: String, reason: String },
}

impl StepAction {
    /// The server this step changes.
    pub fn server(&self) -> &str {
        match self {
            StepAction::ReceiversStopped { server, .. }
            | StepAction::Promoted { server, .. }
            | StepAction::Repointed { server, .. }
            | StepAction::Fenced { server, .. } => server,
        }
    }

    /// Short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            StepAction::ReceiversStopped { .. } => "receivers_stopped",
            StepAction::Promoted { .. } => "promoted",
            StepAction::Repointed { .. } => "repointed",
            StepAction::Fenced { .. } => "fenced",
        }
    }
}

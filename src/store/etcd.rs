//! `Store` on etcd's v3 API (the `etcd-client` crate): a lease per role (the leader key, this
//! process's member key), transactions for create-if-absent and for writes guarded by the leader
//! key, watches to follow the leader key and the recorded primary.
//!
//! Every request runs under a timeout of one renewal interval (a third of `lease_ttl`); the client
//! asks for `require_leader`, so a member without quorum refuses at once instead of hanging.
//! When to renew and until when a leader may act is `lease::LeaseClock`'s business.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    GetResponse, Identity, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::LeaseClock;
use super::{
    Campaign, FailoverStep, LeaderKey, LeaderTerm, Leadership, Member, MemberView, PrimaryRecord,
    PrimaryState, Store, StoreError, SwitchoverOutcome, SwitchoverRequest,
};
use crate::config::StoreConfig;

/// A connection to etcd for one cluster's keys (`[store] prefix`). Cheap to clone; background
/// work (member lease, primary watch) stops when the last clone is dropped.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    ttl: Duration,
    member_lease: std::sync::Mutex<Option<MemberLease>>,
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// This process's member lease and whether its keep-alive task still holds it.
struct MemberLease {
    id: i64,
    alive: Arc<AtomicBool>,
}

/// Runs `fut` under `timeout`, naming the operation and key in the error.
async fn call<T>(
    op: &'static str,
    key: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(StoreError::Etcd {
            op,
            key: key.to_string(),
            source,
        }),
        Err(_) => Err(StoreError::Timeout {
            op,
            key: key.to_string(),
            timeout,
        }),
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        key: key.to_string(),
        source,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store values are plain structs of strings and integers")
}

fn ttl_secs(d: Duration) -> i64 {
    d.as_secs().max(1) as i64
}

impl EtcdStore {
    /// Sets up the client from `[store]`. Without authentication this does not wait for etcd
    /// (connections are made on first use); with it, etcd must answer the login now.
    pub async fn connect(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let clock = LeaseClock::new(cfg.lease_ttl);
        let timeout = clock.request_timeout();
        let endpoints = cfg.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            // HTTP/2 pings notice a member that stopped answering (frozen host, lost route).
            .with_keep_alive(Duration::from_secs(1), timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(user.clone(), password.expose());
        }
        if let Some(tls) = &cfg.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|source| StoreError::TlsFile {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(t);
        }
        let client = match tokio::time::timeout(
            timeout.max(Duration::from_secs(2)),
            Client::connect(&cfg.endpoints, Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => return Err(StoreError::Connect { endpoints, source }),
            Err(_) => {
                return Err(StoreError::Timeout {
                    op: "connect",
                    key: endpoints,
                    timeout,
                })
            }
        };
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                client,
                prefix: cfg.prefix.clone(),
                ttl: cfg.lease_ttl,
                member_lease: std::sync::Mutex::new(None),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    fn timeout(&self) -> Duration {
        LeaseClock::new(self.inner.ttl).request_timeout()
    }

    /// Every key under `prefix`, in one bounded request.
    async fn get_prefix(&self, prefix: &str) -> Result<etcd_client::GetResponse, StoreError> {
        let mut client = self.client();
        call(
            "get",
            prefix,
            self.timeout(),
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.inner.prefix)
    }

    fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// `{prefix}/steps/{epoch:020}-{seq:06}`: sorts by epoch, then seq.
    fn step_key(&self, epoch: u64, seq: u32) -> String {
        self.key(&format!("steps/{epoch:020}-{seq:06}"))
    }

    /// A transaction that applies `ops` only while `leadership` holds the leader key at the
    /// revision it won; otherwise `NotLeader` naming the current holder.
    async fn guarded(
        &self,
        leadership: &Leadership,
        op: &'static str,
        key: &str,
        ops: Vec<TxnOp>,
    ) -> Result<i64, StoreError> {
        // Refused locally: name the holder only when we know it is someone else.
        let not_leader = || StoreError::NotLeader {
            holder: match leadership {
                Leadership::Follower { leader } => leader.clone(),
                Leadership::Leader(_) => None,
            },
        };
        // Refused on our own clock first: past its validity the term must not act, even if etcd
        // would still accept (nobody else can lead yet, but we promised to stop).
        let term = leadership.valid_term().ok_or_else(not_leader)?;
        let leader = self.key("leader");
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader.clone(), CompareOp::Equal, term.revision),
                Compare::value(leader.clone(), CompareOp::Equal, term.id.clone()),
            ])
            .and_then(ops)
            .or_else([TxnOp::get(leader.clone(), None)]);
        let mut client = self.client();
        let resp = call(op, key, self.timeout(), client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        tracing::warn!(
            id = %term.id,
            revision = term.revision,
            holder = holder.as_deref().unwrap_or("nobody"),
            op,
            "guarded store write refused: not the leader any more"
        );
        Err(StoreError::NotLeader { holder })
    }

    /// This process's member lease, granted (and kept alive by a task) on first use or after it
    /// was lost.
    async fn member_lease(&self) -> Result<i64, StoreError> {
        if let Some(id) = self.live_member_lease() {
            return Ok(id);
        }
        let key = self.key("members/");
        let mut client = self.client();
        let sent = Instant::now();
        let grant = call(
            "lease grant",
            &key,
            self.timeout(),
            client.lease_grant(ttl_secs(self.inner.ttl), None),
        )
        .await?;
        let id = grant.id();
        let alive = Arc::new(AtomicBool::new(true));
        let mut clock = LeaseClock::new(self.inner.ttl);
        clock.confirmed(
            sent,
            Duration::from_secs(grant.ttl().max(0) as u64),
            Instant::now(),
        );
        tokio::spawn(keep_member_lease(
            client,
            id,
            clock,
            alive.clone(),
            self.inner.shutdown.clone(),
        ));
        // Two publishes racing here each got a lease: the last one wins, the other's keep-alive
        // task stops and its lease expires on its own.
        let mut slot = self.lock_member_lease();
        if let Some(old) = slot.replace(MemberLease { id, alive }) {
            old.alive.store(false, Ordering::Release);
        }
        Ok(id)
    }

    fn lock_member_lease(&self) -> std::sync::MutexGuard<'_, Option<MemberLease>> {
        self.inner
            .member_lease
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn live_member_lease(&self) -> Option<i64> {
        self.lock_member_lease()
            .as_ref()
            .filter(|l| l.alive.load(Ordering::Acquire))
            .map(|l| l.id)
    }

    fn forget_member_lease(&self, id: i64) {
        let mut slot = self.lock_member_lease();
        if slot.as_ref().is_some_and(|l| l.id == id) {
            if let Some(l) = slot.take() {
                l.alive.store(false, Ordering::Release);
            }
        }
    }
}

/// Renews the member lease until the store is dropped (then revokes it) or etcd says it is gone.
async fn keep_member_lease(
    mut client: Client,
    id: i64,
    mut clock: LeaseClock,
    alive: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    loop {
        let next = clock
            .next_renewal()
            .unwrap_or_else(|| Instant::now() + clock.renew_every());
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(clock.request_timeout(), client.lease_revoke(id)).await;
                alive.store(false, Ordering::Release);
                return;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        if !alive.load(Ordering::Acquire) {
            return;
        }
        let sent = Instant::now();
        clock.attempt(sent);
        match tokio::time::timeout(
            clock.request_timeout(),
            keep_alive_once(&mut client, &mut keeper, id),
        )
        .await
        {
            Ok(Ok(ttl)) if ttl > 0 => {
                clock.confirmed(sent, Duration::from_secs(ttl as u64), Instant::now());
            }
            Ok(Ok(_)) => {
                tracing::warn!(
                    lease = id,
                    "member lease expired in etcd; the next publish takes a new one"
                );
                alive.store(false, Ordering::Release);
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "member lease renewal failed");
                keeper = None;
            }
            Err(_) => {
                tracing::debug!(lease = id, "member lease renewal timed out");
                keeper = None;
            }
        }
        // Past its TTL without a renewal, etcd has dropped it (or will before it hears from us).
        if clock
            .valid_until()
            .is_some_and(|u| Instant::now() > u + clock.margin())
        {
            alive.store(false, Ordering::Release);
            return;
        }
    }
}

/// One keep-alive round trip on the (re)opened stream; returns etcd's TTL (0: lease gone).
async fn keep_alive_once(
    client: &mut Client,
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    id: i64,
) -> Result<i64, etcd_client::Error> {
    if keeper.is_none() {
        *keeper = Some(client.lease_keep_alive(id).await?);
    }
    let (k, stream) = keeper.as_mut().expect("set just above");
    k.keep_alive().await?;
    match stream.message().await? {
        Some(resp) => Ok(resp.ttl()),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "keep-alive stream closed".into(),
        )),
    }
}

impl Store for EtcdStore {
    async fn campaign(&self, id: &str) -> Result<Campaign, StoreError> {
        let (tx, rx) = watch::channel(Leadership::Follower { leader: None });
        let (resign_tx, resign_rx) = oneshot::channel();
        let campaigner = Campaigner {
            client: self.client(),
            key: self.key("leader"),
            id: id.to_string(),
            ttl: self.inner.ttl,
            tx,
        };
        let task = tokio::spawn(campaigner.run(resign_rx));
        Ok(Campaign::new(rx, resign_tx, task))
    }

    async fn leader(&self) -> Result<Option<LeaderKey>, StoreError> {
        let key = self.key("leader");
        let mut client = self.client();
        let resp = call("get", &key, self.timeout(), client.get(key.clone(), None)).await?;
        Ok(resp.kvs().first().map(|kv| LeaderKey {
            id: String::from_utf8_lossy(kv.value()).into_owned(),
            revision: kv.create_revision(),
            lease: kv.lease(),
        }))
    }

    async fn publish_member(&self, id: &str, view: &MemberView) -> Result<(), StoreError> {
        let key = self.key(&format!("members/{id}"));
        let lease = self.member_lease().await?;
        let mut client = self.client();
        let put = client.put(
            key.clone(),
            encode(view),
            Some(PutOptions::new().with_lease(lease)),
        );
        match call("put", &key, self.timeout(), put).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Perhaps the lease is gone (etcd lost it, or it expired while we were away):
                // the next publish takes a new one.
                if matches!(e, StoreError::Etcd { .. }) {
                    self.forget_member_lease(lease);
                }
                Err(e)
            }
        }
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let prefix = self.key("members/");
        let mut client = self.client();
        let resp = self.get_prefix(&prefix).await?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let id = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            let view: MemberView = decode(&key, kv.value())?;
            let lease_age = if kv.lease() == 0 {
                None
            } else {
                let ttl = call(
                    "lease time-to-live",
                    &key,
                    self.timeout(),
                    client.lease_time_to_live(kv.lease(), None),
                )
                .await?;
                (ttl.ttl() >= 0)
                    .then(|| Duration::from_secs((ttl.granted_ttl() - ttl.ttl()).max(0) as u64))
            };
            out.push(Member {
                id,
                view,
                lease_age,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn record_primary(
        &self,
        leadership: &Leadership,
        record: &PrimaryRecord,
    ) -> Result<i64, StoreError> {
        let key = self.key("primary");
        let rev = self
            .guarded(
                leadership,
                "record primary",
                &key,
                vec![TxnOp::put(key.clone(), encode(record), None)],
            )
            .await?;
        tracing::info!(
            primary = %record.name,
            timeline = record.timeline,
            epoch = record.epoch,
            revision = rev,
            "recorded primary in the store"
        );
        Ok(rev)
    }

    async fn primary(&self) -> Result<Option<PrimaryRecord>, StoreError> {
        let key = self.key("primary");
        let mut client = self.client();
        let resp = call("get", &key, self.timeout(), client.get(key.clone(), None)).await?;
        resp.kvs()
            .first()
            .map(|kv| decode(&key, kv.value()))
            .transpose()
    }

    fn watch_primary(&self) -> watch::Receiver<PrimaryState> {
        let (tx, rx) = watch::channel(PrimaryState::default());
        let follower = PrimaryFollower {
            client: self.client(),
            key: self.key("primary"),
            every: LeaseClock::new(self.inner.ttl).renew_every(),
            tx,
            shutdown: self.inner.shutdown.clone(),
        };
        tokio::spawn(follower.run());
        rx
    }

    async fn record_step(
        &self,
        leadership: &Leadership,
        step: &FailoverStep,
    ) -> Result<i64, StoreError> {
        let key = self.step_key(step.epoch, step.seq);
        let rev = self
            .guarded(
                leadership,
                "record step",
                &key,
                vec![TxnOp::put(key.clone(), encode(step), None)],
            )
            .await?;
        tracing::info!(
            epoch = step.epoch,
            seq = step.seq,
            action = step.action.as_str(),
            server = step.action.server(),
            "journalled failover step"
        );
        Ok(rev)
    }

    async fn steps(&self) -> Result<Vec<FailoverStep>, StoreError> {
        let resp = self.get_prefix(&self.key("steps/")).await?;
        let mut steps = resp
            .kvs()
            .iter()
            .map(|kv| decode::<FailoverStep>(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect::<Result<Vec<_>, _>>()?;
        steps.sort_by_key(|s| (s.epoch, s.seq));
        Ok(steps)
    }

    async fn clear_steps(&self, leadership: &Leadership, epoch: u64) -> Result<(), StoreError> {
        let from = self.key("steps/");
        let to = self.step_key(epoch.saturating_add(1), 0);
        self.guarded(
            leadership,
            "clear steps",
            &from,
            vec![TxnOp::delete(
                from.clone(),
                Some(DeleteOptions::new().with_range(to)),
            )],
        )
        .await?;
        Ok(())
    }

    async fn request_switchover(&self, request: &SwitchoverRequest) -> Result<(), StoreError> {
        let key = self.key("switchover");
        let mut client = self.client();
        call(
            "put",
            &key,
            self.timeout(),
            client.put(key.clone(), encode(request), None),
        )
        .await
        .map(|_| ())
    }

    async fn switchover_request(&self) -> Result<Option<SwitchoverRequest>, StoreError> {
        self.get_json("switchover").await
    }

    async fn finish_switchover(
        &self,
        leadership: &Leadership,
        outcome: &SwitchoverOutcome,
    ) -> Result<(), StoreError> {
        let request = self.key("switchover");
        let key = self.key("switchover_outcome");
        self.guarded(
            leadership,
            "finish switchover",
            &key,
            vec![
                TxnOp::delete(request, None),
                TxnOp::put(key.clone(), encode(outcome), None),
            ],
        )
        .await
        .map(|_| ())
    }

    async fn switchover_outcome(&self) -> Result<Option<SwitchoverOutcome>, StoreError> {
        self.get_json("switchover_outcome").await
    }
}

impl EtcdStore {
    /// The JSON value at `{prefix}/{rest}`, if any.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        rest: &str,
    ) -> Result<Option<T>, StoreError> {
        let key = self.key(rest);
        let mut client = self.client();
        let resp = call("get", &key, self.timeout(), client.get(key.clone(), None)).await?;
        resp.kvs()
            .first()
            .map(|kv| decode(&key, kv.value()))
            .transpose()
    }
}

/// The campaign task: follow until the leader key is free, take it, lead while the lease holds.
struct Campaigner {
    client: Client,
    key: String,
    id: String,
    ttl: Duration,
    tx: watch::Sender<Leadership>,
}

enum Attempt {
    Won(LeaderTerm, LeaseClock),
    /// Held by someone else (`holder`), as of store revision `revision`.
    Held {
        holder: String,
        revision: i64,
    },
}

enum LeadEnd {
    Resigned,
    SteppedDown,
}

impl Campaigner {
    fn publish(&self, l: Leadership) {
        self.tx.send_if_modified(|cur| {
            if *cur == l {
                false
            } else {
                *cur = l;
                true
            }
        });
    }

    fn timeout(&self) -> Duration {
        LeaseClock::new(self.ttl).request_timeout()
    }

    async fn run(mut self, mut resign: oneshot::Receiver<()>) {
        loop {
            let won = tokio::select! {
                _ = &mut resign => {
                    self.publish(Leadership::Follower { leader: None });
                    return;
                }
                won = self.follow() => won,
            };
            let (term, clock) = won;
            let lease = term.lease;
            let end = self.lead(term, clock, &mut resign).await;
            // Give the key up at once, if it is still ours, rather than making the others wait
            // out the TTL. Best effort: unanswered, the lease expires on its own.
            let _ = call(
                "lease revoke",
                &self.key,
                self.timeout(),
                self.client.lease_revoke(lease),
            )
            .await;
            if let LeadEnd::Resigned = end {
                tracing::info!(id = %self.id, "resigned the leadership");
                self.publish(Leadership::Follower { leader: None });
                return;
            }
        }
    }

    /// Waits (as a follower) until this campaigner holds the leader key.
    async fn follow(&mut self) -> (LeaderTerm, LeaseClock) {
        let mut watcher: Option<WatchStream> = None;
        loop {
            match self.attempt().await {
                Ok(Attempt::Won(term, clock)) => return (term, clock),
                Ok(Attempt::Held { holder, revision }) => {
                    self.publish(Leadership::Follower {
                        leader: Some(holder),
                    });
                    if watcher.is_none() {
                        let opts = WatchOptions::new().with_start_revision(revision + 1);
                        watcher = tokio::time::timeout(
                            self.timeout(),
                            self.client.watch(self.key.clone(), Some(opts)),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok);
                    }
                }
                Err(e) => {
                    tracing::debug!(id = %self.id, error = %e, "leader key not reachable");
                    self.publish(Leadership::Follower { leader: None });
                    watcher = None;
                }
            }
            let every = LeaseClock::new(self.ttl).renew_every();
            match watcher.as_mut() {
                // A change of the key (its deletion above all) wakes us at once; otherwise we
                // look again every renewal interval.
                Some(w) => match tokio::time::timeout(every, w.message()).await {
                    Ok(Ok(Some(resp))) if !resp.canceled() => {}
                    Ok(_) => watcher = None,
                    Err(_) => {}
                },
                None => tokio::time::sleep(every).await,
            }
        }
    }

    /// One try: if the key is free, take it under a fresh lease (create-if-absent).
    async fn attempt(&mut self) -> Result<Attempt, StoreError> {
        let timeout = self.timeout();
        let got = call(
            "get",
            &self.key,
            timeout,
            self.client.get(self.key.clone(), None),
        )
        .await?;
        if let Some(a) = held(&got) {
            return Ok(a);
        }
        let sent = Instant::now();
        let grant = call(
            "lease grant",
            &self.key,
            timeout,
            self.client.lease_grant(ttl_secs(self.ttl), None),
        )
        .await?;
        let lease = grant.id();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.key.clone(),
                self.id.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.key.clone(), None)]);
        let resp = match call(
            "create leader key",
            &self.key,
            timeout,
            self.client.txn(txn),
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = call(
                    "lease revoke",
                    &self.key,
                    timeout,
                    self.client.lease_revoke(lease),
                )
                .await;
                return Err(e);
            }
        };
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut clock = LeaseClock::new(self.ttl);
            let granted = Duration::from_secs(grant.ttl().max(0) as u64);
            clock.confirmed(sent, granted, Instant::now());
            let until = clock.valid_until().unwrap_or(sent);
            tracing::info!(id = %self.id, revision, lease, "won the leadership");
            return Ok(Attempt::Won(
                LeaderTerm::new(self.id.clone(), revision, lease, until),
                clock,
            ));
        }
        let _ = call(
            "lease revoke",
            &self.key,
            timeout,
            self.client.lease_revoke(lease),
        )
        .await;
        let other = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => held(&g),
            _ => None,
        });
        Ok(other.unwrap_or(Attempt::Held {
            holder: String::new(),
            revision: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Leads until resigned, the lease lapses on our clock, or the key is no longer ours.
    async fn lead(
        &mut self,
        term: LeaderTerm,
        mut clock: LeaseClock,
        resign: &mut oneshot::Receiver<()>,
    ) -> LeadEnd {
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        self.publish(Leadership::Leader(term.clone()));
        loop {
            let Some(lapse_at) = clock.valid_until() else {
                return LeadEnd::SteppedDown;
            };
            let next = clock.next_renewal().unwrap_or(lapse_at);
            tokio::select! {
                _ = &mut *resign => return LeadEnd::Resigned,
                _ = tokio::time::sleep_until(lapse_at) => {
                    tracing::warn!(
                        id = %self.id,
                        revision = term.revision,
                        "leader lease not renewed in time: stopped acting, stepping down"
                    );
                    self.publish(Leadership::Follower { leader: None });
                    return LeadEnd::SteppedDown;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            let sent = Instant::now();
            clock.attempt(sent);
            // Never wait for an answer past the lapse: it could not count any more.
            let deadline = (sent + clock.request_timeout()).min(lapse_at);
            match tokio::time::timeout_at(deadline, self.renew(&mut keeper, &term)).await {
                Ok(Ok(Renewal::Renewed(granted))) => {
                    if clock.confirmed(sent, granted, Instant::now()) {
                        if let Some(u) = clock.valid_until() {
                            term.set_valid_until(u);
                        }
                    }
                }
                Ok(Ok(Renewal::Lost(holder))) => {
                    tracing::warn!(
                        id = %self.id,
                        revision = term.revision,
                        holder = holder.as_deref().unwrap_or("nobody"),
                        "leader key lost: stepping down"
                    );
                    // Stop acting now, whatever the clock says.
                    term.set_valid_until(sent);
                    self.publish(Leadership::Follower { leader: holder });
                    return LeadEnd::SteppedDown;
                }
                Ok(Err(e)) => {
                    tracing::debug!(id = %self.id, error = %e, "leader lease renewal failed");
                    keeper = None;
                }
                Err(_) => {
                    tracing::debug!(id = %self.id, "leader lease renewal unanswered");
                    keeper = None;
                }
            }
        }
    }

    /// Renews the lease, then checks that the key is still the one this term created.
    async fn renew(
        &mut self,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        term: &LeaderTerm,
    ) -> Result<Renewal, etcd_client::Error> {
        let ttl = keep_alive_once(&mut self.client, keeper, term.lease).await?;
        let got = self.client.get(self.key.clone(), None).await?;
        let kv = got.kvs().first();
        let holder = kv.map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let ours = kv.is_some_and(|kv| {
            kv.create_revision() == term.revision && kv.value() == term.id.as_bytes()
        });
        if ttl <= 0 || !ours {
            return Ok(Renewal::Lost(holder.filter(|_| !ours)));
        }
        Ok(Renewal::Renewed(Duration::from_secs(ttl as u64)))
    }
}

enum Renewal {
    Renewed(Duration),
    Lost(Option<String>),
}

/// The leader key's holder, if a get found one.
fn held(got: &GetResponse) -> Option<Attempt> {
    got.kvs().first().map(|kv| Attempt::Held {
        holder: String::from_utf8_lossy(kv.value()).into_owned(),
        revision: got.header().map_or(kv.mod_revision(), |h| h.revision()),
    })
}

/// The `watch_primary` task.
struct PrimaryFollower {
    client: Client,
    key: String,
    every: Duration,
    tx: watch::Sender<PrimaryState>,
    shutdown: CancellationToken,
}

impl PrimaryFollower {
    async fn run(mut self) {
        let mut watcher: Option<WatchStream> = None;
        loop {
            if self.tx.is_closed() || self.shutdown.is_cancelled() {
                return;
            }
            match call(
                "get",
                &self.key,
                self.every,
                self.client.get(self.key.clone(), None),
            )
            .await
            {
                Ok(got) => {
                    let now = Instant::now();
                    let revision = got.header().map_or(0, |h| h.revision());
                    let (record, rev) = match got.kvs().first() {
                        Some(kv) => match decode::<PrimaryRecord>(&self.key, kv.value()) {
                            Ok(r) => (Some(r), kv.mod_revision()),
                            Err(e) => {
                                tracing::warn!(error = %e, "recorded primary unreadable; keeping the last one");
                                self.failed(&e);
                                let cur = self.tx.borrow();
                                (cur.record.clone(), cur.revision)
                            }
                        },
                        None => (None, 0),
                    };
                    self.update(record, rev, true, Some(now));
                    if watcher.is_none() {
                        let opts = WatchOptions::new().with_start_revision(revision + 1);
                        watcher = tokio::time::timeout(
                            self.every,
                            self.client.watch(self.key.clone(), Some(opts)),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "store unreachable; keeping the last recorded primary");
                    self.failed(&e);
                    let (record, rev) = {
                        let cur = self.tx.borrow();
                        (cur.record.clone(), cur.revision)
                    };
                    let last = self.tx.borrow().last_contact;
                    self.update(record, rev, false, last);
                    watcher = None;
                }
            }
            // Wake on a watch event, or look again after one interval (which also tells whether
            // the store still answers).
            let wait = tokio::time::sleep(self.every);
            tokio::pin!(wait);
            loop {
                let wake = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = self.tx.closed() => return,
                    _ = &mut wait => None,
                    msg = async {
                        match watcher.as_mut() {
                            Some(w) => w.message().await,
                            None => std::future::pending().await,
                        }
                    } => Some(msg),
                };
                match wake {
                    None => break,
                    Some(Ok(Some(resp))) if !resp.canceled() => {
                        for ev in resp.events() {
                            let (record, rev) = match (ev.event_type(), ev.kv()) {
                                (EventType::Put, Some(kv)) => {
                                    match decode::<PrimaryRecord>(&self.key, kv.value()) {
                                        Ok(r) => (Some(r), kv.mod_revision()),
                                        Err(_) => continue,
                                    }
                                }
                                (EventType::Delete, kv) => {
                                    (None, kv.map_or(0, |k| k.mod_revision()))
                                }
                                _ => continue,
                            };
                            self.update(record, rev, true, Some(Instant::now()));
                        }
                    }
                    Some(_) => {
                        watcher = None;
                        break;
                    }
                }
            }
        }
    }

    /// Counts a failed read (every receiver is woken: the count is part of the state).
    fn failed(&self, e: &StoreError) {
        self.tx.send_modify(|cur| {
            cur.errors += 1;
            cur.last_error = Some(e.into());
        });
    }

    fn update(
        &self,
        record: Option<PrimaryRecord>,
        revision: i64,
        reachable: bool,
        last_contact: Option<Instant>,
    ) {
        self.tx.send_if_modified(|cur| {
            let changed =
                cur.record != record || cur.revision != revision || cur.reachable != reachable;
            cur.record = record;
            cur.revision = revision;
            cur.reachable = reachable;
            cur.last_contact = last_contact;
            changed
        });
    }
}

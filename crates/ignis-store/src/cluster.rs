//! The cluster's state in PostgreSQL: membership, actor leases and the
//! nodes' shared secret. The database is the only authority; nodes keep no
//! state about each other that the database does not confirm.
//!
//! - **Membership** (`ignis_nodes`): a node is a row with its advertised
//!   internal address and `expires_at`, which its heartbeat pushes forward
//!   ([`PgStore::heartbeat`]). A node whose `expires_at` is past (by the
//!   database's clock, the one clock every decision uses) is dead to the
//!   others. A node id is new at every process start, so a restarted node
//!   never inherits its previous incarnation's activations.
//! - **Actor leases** (`ignis_actor_leases`): `(class, id) -> node, epoch`.
//!   [`PgStore::acquire`] is one statement: the caller becomes the owner if
//!   there is no lease, or if the owner's membership has expired, and the
//!   epoch then grows by one (recorded in `ignis_actor_owners`, one row per
//!   epoch, which is how tests and operators see the history). A lease does
//!   not expire by itself: it is valid while its node's membership is,
//!   so a node renews every lease it holds with one heartbeat.
//! - **Fencing**: every actor commit made under a lease carries it
//!   ([`crate::Fence`]); the commit's first statement, in the same
//!   transaction, locks the lease row and refuses the commit if the lease
//!   moved ([`crate::StoreError::Fenced`]). A takeover updates the row, so
//!   it waits for a commit in flight, and a commit after it fails: a stale
//!   owner (paused, partitioned, slow) can never commit.
//! - **Alarms** are owned with their actor: [`PgStore::due_alarms`] gives a
//!   node the alarms of actors it owns and of actors nobody live owns; the
//!   node fires one by acquiring the actor first.

use std::time::Duration;

use crate::postgres::key_string;
use crate::{ActorKey, PgStore, StoreError};

/// Where an actor lives, by the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The caller owns it, under this epoch.
    Me {
        /// The lease's epoch.
        epoch: u64,
    },
    /// A live node owns it.
    Node {
        /// Its id.
        node: String,
        /// Its advertised internal address.
        address: String,
    },
}

/// A member of the cluster, as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's id.
    pub node: String,
    /// Its advertised internal address.
    pub address: String,
    /// Whether its membership is current.
    pub alive: bool,
    /// The last deploy record it took (0: none).
    pub applied_seq: i64,
    /// Why it could not apply that record, if it could not.
    pub applied_error: Option<String>,
}

/// Takes the lease of `(class, id)` for node `$3` if nobody holds it or
/// its holder is dead, recording the new epoch. No row: not taken.
const ACQUIRE: &str = "WITH me AS (
    SELECT 1 FROM ignis_nodes WHERE node = $3 AND expires_at > now()
), taken AS (
    INSERT INTO ignis_actor_leases AS l (class, id, node, epoch)
    SELECT $1, $2, $3, 1 FROM me
    ON CONFLICT (class, id) DO UPDATE SET node = excluded.node, epoch = l.epoch + 1
    WHERE l.node <> excluded.node AND NOT EXISTS (
        SELECT 1 FROM ignis_nodes n WHERE n.node = l.node AND n.expires_at > now())
    RETURNING l.class, l.id, l.node, l.epoch
), recorded AS (
    INSERT INTO ignis_actor_owners (class, id, epoch, node)
    SELECT class, id, epoch, node FROM taken
)
SELECT epoch FROM taken";

/// The lease of `(class, id)`, its node's address and whether it is alive.
const LEASE: &str = "SELECT l.node, l.epoch, n.address, COALESCE(n.expires_at > now(), false)
    FROM ignis_actor_leases l LEFT JOIN ignis_nodes n ON n.node = l.node
    WHERE l.class = $1 AND l.id = $2";

/// Owner epochs kept per actor in `ignis_actor_owners` (older ones are
/// pruned by [`PgStore::prune`]).
pub const OWNER_HISTORY: i64 = 64;

fn unsigned(e: i64) -> u64 {
    u64::try_from(e).unwrap_or(0)
}

impl PgStore {
    /// Registers `node` (or renews its membership): it is alive until
    /// `lease` from now, by the database's clock. Its address is what other
    /// nodes forward its actors' messages to.
    pub async fn heartbeat(
        &self,
        node: &str,
        address: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.read(
            "INSERT INTO ignis_nodes (node, address, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (node) DO UPDATE
             SET address = excluded.address, expires_at = excluded.expires_at",
            &[&node, &address, &lease.as_secs_f64()],
        )
        .await
        .map(drop)
    }

    /// Removes `node` from the membership (a clean stop): its actors can be
    /// taken over at once instead of after its lease.
    pub async fn leave(&self, node: &str) -> Result<(), StoreError> {
        self.read("DELETE FROM ignis_nodes WHERE node = $1", &[&node])
            .await
            .map(drop)
    }

    /// Drops what dead nodes left behind: membership rows expired for an
    /// hour, cron claims older than a day, and owner history past the last
    /// [`OWNER_HISTORY`] epochs of each actor. Leases of dead nodes stay (they are what the next owner
    /// bumps).
    pub async fn prune(&self) -> Result<(), StoreError> {
        self.read(
            "DELETE FROM ignis_nodes WHERE expires_at < now() - interval '1 hour'",
            &[],
        )
        .await?;
        self.read(
            "DELETE FROM ignis_cron_runs
             WHERE at_ms < (extract(epoch FROM now()) * 1000)::bigint - 86400000",
            &[],
        )
        .await?;
        self.read(
            "DELETE FROM ignis_actor_owners h USING ignis_actor_leases l
             WHERE h.class = l.class AND h.id = l.id AND h.epoch <= l.epoch - $1",
            &[&OWNER_HISTORY],
        )
        .await
        .map(drop)
    }

    /// Claims occurrence `at_ms` of cron trigger `trigger` for `node`:
    /// true if no node had claimed it.
    pub async fn claim_cron(
        &self,
        trigger: &str,
        at_ms: i64,
        node: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .read_one(
                "INSERT INTO ignis_cron_runs (trigger, at_ms, node) VALUES ($1, $2, $3)
                 ON CONFLICT (trigger, at_ms) DO NOTHING RETURNING 1",
                &[&trigger, &at_ms, &node],
            )
            .await?
            .is_some())
    }

    /// Every node of the membership table, alive or not, by id.
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let rows = self
            .read(
                "SELECT node, address, expires_at > now(), applied_seq, applied_error
                 FROM ignis_nodes ORDER BY node",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Member {
                node: r.get(0),
                address: r.get(1),
                alive: r.get(2),
                applied_seq: r.get(3),
                applied_error: r.get(4),
            })
            .collect())
    }

    /// Records that `node` took deploy record `seq`, and why it could not
    /// apply it (`error`), for `ignis cluster apply` to report.
    pub async fn report_applied(
        &self,
        node: &str,
        seq: i64,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.read(
            "UPDATE ignis_nodes SET applied_seq = $2, applied_error = $3 WHERE node = $1",
            &[&node, &seq, &error],
        )
        .await
        .map(drop)
    }

    /// Makes `node` the owner of `actor` if nobody live owns it, else says
    /// who does. Fails with [`StoreError::Unavailable`] if `node`'s own
    /// membership has expired (it may own nothing until it renews).
    pub async fn acquire(&self, actor: &ActorKey, node: &str) -> Result<Owner, StoreError> {
        let (class, id) = (actor.class(), actor.id().as_bytes());
        // Twice at most: the owner may die between the two statements.
        for _ in 0..2 {
            if let Some(row) = self.read_one(ACQUIRE, &[&class, &id, &node]).await? {
                return Ok(Owner::Me {
                    epoch: unsigned(row.get(0)),
                });
            }
            let Some(row) = self.read_one(LEASE, &[&class, &id]).await? else {
                // Not inserted: this node is not a live member.
                return Err(lapsed());
            };
            let (owner, e, address, alive): (String, i64, Option<String>, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            match (owner == node, alive) {
                (true, true) => return Ok(Owner::Me { epoch: unsigned(e) }),
                (true, false) => return Err(lapsed()),
                (false, true) => {
                    return Ok(Owner::Node {
                        node: owner,
                        address: address.unwrap_or_default(),
                    });
                }
                (false, false) => continue,
            }
        }
        Err(StoreError::Unavailable(
            "the actor's owner changed twice while it was placed; try again".into(),
        ))
    }

    /// The owners `actor` has had, by epoch (the last [`OWNER_HISTORY`]).
    pub async fn owner_history(&self, actor: &ActorKey) -> Result<Vec<(u64, String)>, StoreError> {
        let rows = self
            .read(
                "SELECT epoch, node FROM ignis_actor_owners WHERE class = $1 AND id = $2
                 ORDER BY epoch",
                &[&actor.class(), &actor.id().as_bytes()],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (unsigned(r.get(0)), r.get(1)))
            .collect())
    }

    /// Alarms due before `until_ms` (Unix milliseconds) of actors that
    /// `node` owns or that no live node owns, earliest first, at most
    /// `limit`.
    pub async fn due_alarms(
        &self,
        node: &str,
        until_ms: u64,
        limit: i64,
    ) -> Result<Vec<(ActorKey, u64)>, StoreError> {
        let until = i64::try_from(until_ms).unwrap_or(i64::MAX);
        let rows = self
            .read(
                "SELECT a.class, a.id, a.at_ms FROM ignis_actor_alarms a
                 LEFT JOIN ignis_actor_leases l ON l.class = a.class AND l.id = a.id
                 LEFT JOIN ignis_nodes n ON n.node = l.node AND n.expires_at > now()
                 WHERE a.at_ms <= $2 AND (l.node IS NULL OR l.node = $1 OR n.node IS NULL)
                 ORDER BY a.at_ms LIMIT $3",
                &[&node, &until, &limit],
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                let id = key_string(r.get(1))?;
                Ok((ActorKey::new(r.get::<_, String>(0), id), unsigned(r.get(2))))
            })
            .collect()
    }

    /// The cluster's value `name` (created as `value` by the first node
    /// that asks): how nodes share a secret without configuring one.
    pub async fn cluster_value(&self, name: &str, value: &str) -> Result<String, StoreError> {
        self.read(
            "INSERT INTO ignis_cluster (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &value],
        )
        .await?;
        let row = self
            .read_one("SELECT value FROM ignis_cluster WHERE name = $1", &[&name])
            .await?
            .ok_or_else(|| StoreError::Engine(format!("cluster value `{name}` vanished")))?;
        Ok(row.get(0))
    }
}

fn lapsed() -> StoreError {
    StoreError::Unavailable(
        "this node's cluster membership has expired; it owns no actor until its heartbeat \
         renews it"
            .into(),
    )
}

/// One change of the cluster's deployments, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRow {
    /// Its number: one more than the change it was made on.
    pub seq: i64,
    /// SHA-256 of the manifest text the change was made on (kept for
    /// the record; nodes take a change's shared sections whatever file
    /// they were started with).
    pub base: String,
    /// The shared sections of the manifest (functions, actors, routes,
    /// triggers) after the change, as TOML.
    pub document: String,
    /// Which components the document names by hash (the node's own JSON).
    pub components: String,
    /// The node that made it.
    pub node: String,
    /// Who made it.
    pub by: String,
}

/// Deploy records kept (older ones, and components only they named, are
/// pruned by [`PgStore::prune`]).
pub const DEPLOY_HISTORY: i64 = 100;

/// The `NOTIFY` channel of deploys.
pub const DEPLOY_CHANNEL: &str = "ignis_deploys";

impl PgStore {
    /// Records `row` as change number `row.seq` of the cluster's
    /// deployments, with the component bytes it adds, and notifies the
    /// other nodes, all in one transaction. `Ok(false)`: another node
    /// recorded change `row.seq` first (nothing was written).
    pub async fn publish_deploy(
        &self,
        row: &DeployRow,
        components: &[(String, Vec<u8>)],
    ) -> Result<bool, StoreError> {
        let mut c = self.reader().await?;
        let tx = c.transaction().await?;
        for (sha, bytes) in components {
            tx.execute(
                "INSERT INTO ignis_components (sha256, bytes) VALUES ($1, $2)
                 ON CONFLICT (sha256) DO NOTHING",
                &[sha, bytes],
            )
            .await?;
        }
        let inserted = tx
            .execute(
                "INSERT INTO ignis_deploys (seq, base, document, components, node, by_whom)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (seq) DO NOTHING",
                &[
                    &row.seq,
                    &row.base,
                    &row.document,
                    &row.components,
                    &row.node,
                    &row.by,
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(false);
        }
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&DEPLOY_CHANNEL, &row.seq.to_string()],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The cluster's latest deploy record, if any.
    pub async fn latest_deploy(&self) -> Result<Option<DeployRow>, StoreError> {
        let row = self
            .read_one(
                "SELECT seq, base, document, components, node, by_whom FROM ignis_deploys
                 ORDER BY seq DESC LIMIT 1",
                &[],
            )
            .await?;
        Ok(row.map(|r| DeployRow {
            seq: r.get(0),
            base: r.get(1),
            document: r.get(2),
            components: r.get(3),
            node: r.get(4),
            by: r.get(5),
        }))
    }

    /// The bytes of the component whose SHA-256 is `sha256`, if stored.
    pub async fn component(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self
            .read_one(
                "SELECT bytes FROM ignis_components WHERE sha256 = $1",
                &[&sha256],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Drops deploy records past the last [`DEPLOY_HISTORY`] and the
    /// components no remaining record names.
    pub async fn prune_deploys(&self) -> Result<(), StoreError> {
        self.read(
            "DELETE FROM ignis_deploys WHERE seq <= (SELECT max(seq) FROM ignis_deploys) - $1",
            &[&DEPLOY_HISTORY],
        )
        .await?;
        self.read(
            "DELETE FROM ignis_components c WHERE NOT EXISTS (
                 SELECT 1 FROM ignis_deploys d WHERE strpos(d.components, c.sha256) > 0)",
            &[],
        )
        .await
        .map(drop)
    }

    /// Listens on `channel` on a connection of its own, sending each
    /// notification's payload to the returned receiver (bounded; a full
    /// receiver drops payloads, which only tell to look again). Reconnects
    /// after a lost connection, sending an empty payload once it listens
    /// again (what was notified meanwhile is lost: look again).
    pub fn listen(&self, channel: &'static str) -> tokio::sync::mpsc::Receiver<String> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let config = self.config().clone();
        let target = self.target().to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !tx.is_closed() {
                match listen_once(&config, channel, &tx).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(database = %target, error = %e, "LISTEN {channel} failed; trying again");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        rx
    }
}

/// One `LISTEN` session, until its connection ends or nobody listens.
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    tx: &tokio::sync::mpsc::Sender<String>,
) -> Result<(), StoreError> {
    use futures_util::StreamExt as _;
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (notes, mut notified) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = notes.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(e) => return Err(StoreError::from(e)),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    let _ = tx.try_send(String::new());
    loop {
        tokio::select! {
            note = notified.recv() => match note {
                Some(payload) => {
                    let _ = tx.try_send(payload);
                }
                None => break,
            },
            () = tx.closed() => break,
        }
    }
    drop(client);
    driver
        .await
        .map_err(|e| StoreError::Engine(e.to_string()))?
}

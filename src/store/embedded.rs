//! The embedded store: one redb file, the default backend. Nothing is lost on restart, and a
//! crash leaves the file as of its last commit: every write is part of one committed write
//! transaction, never applied halfway.
//!
//! redb is synchronous, so none of its calls run on a tokio worker, where a disk wait would
//! stall every connection that worker serves: reads run in `spawn_blocking`, and writes go to
//! one writer thread. That thread exists for speed: a durable commit is an fsync (about 4,000 a
//! second on the machine this was measured on), and a login is two writes, so it commits every
//! write waiting at the time in one transaction ("group commit"). Writes are applied one after
//! another inside it, each seeing the ones before, so `rotate_refresh` and `claim_exchange` stay
//! atomic, and a commit either keeps all of them or none.
//!
//! Expiry: each expiring value carries its deadline and counts as absent once past it; an index
//! ordered by deadline lets every commit remove a few expired entries, in proportion to what
//! it writes, so the file stops growing without a full scan ever running on a request.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    AccessGuard, Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, Table,
    TableDefinition, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::{Digest, ExchangeClaim, Revoked, Rotation, SessionRecord, Store, StoreError};
use crate::config::Secret;

/// (appid, openid) → the newest session_key. Kept like the memory store keeps it: one per user,
/// replaced at each login, never expiring.
const SESSION_KEYS: TableDefinition<(&str, &str), &str> = TableDefinition::new("session_keys");
/// sid → [`StoredSession`]; removed when the session is revoked.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// Refresh-token digest → [`RefreshMeta`], with the sealed successor once rotated.
const REFRESH: TableDefinition<&Digest, &[u8]> = TableDefinition::new("refresh_tokens");
/// Revocation sequence number → the revoked sid, listed until the deadline.
const REVOKED: TableDefinition<u64, &[u8]> = TableDefinition::new("revoked");
/// Code digest → whether the exchange is done, with its sealed outcome once it is.
const EXCHANGES: TableDefinition<&Digest, &[u8]> = TableDefinition::new("exchanges");
/// (deadline in unix ms, [`kind`], key) for every expiring entry, oldest first.
const EXPIRY: TableDefinition<(u64, u8, &[u8]), ()> = TableDefinition::new("expiry");
/// Counters that must survive restarts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The last revocation's sequence number: the cursor of [`Store::revoked_since`]. Persisted, so
/// that it keeps increasing across restarts.
const REVOCATION_SEQ: &str = "revocation_seq";

/// Pages redb may cache in memory. Its default (1 GiB) suits a database server, not a sidecar.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// At most this many writes share one commit, so a burst is answered in a few commits rather
/// than held back for one huge one.
const MAX_BATCH: usize = 256;
/// Expired entries a commit removes per write in it. A write adds at most two expiring
/// entries, so expired ones are removed faster than new ones arrive.
const SWEEP_PER_WRITE: usize = 4;

/// Which table an [`EXPIRY`] entry points into. Part of the file format: never renumber.
mod kind {
    pub const SESSION: u8 = 0;
    pub const REFRESH: u8 = 1;
    pub const REVOKED: u8 = 2;
    pub const EXCHANGE: u8 = 3;
    /// A new session and its first refresh token, under one entry: their refresh digest, then
    /// the sid. An entry costs a login as much as a record does, and the two end together.
    pub const LOGIN: u8 = 4;
}

/// A session as stored: its record, and how long its access tokens can be accepted. Kept until
/// both have ended, so that revoking an expired session still lists it as long as its last
/// access token lives.
#[derive(Serialize, serde::Deserialize)]
struct StoredSession {
    #[serde(flatten)]
    record: SessionRecord,
    /// Unix seconds. Absent from records written before it was kept: then 0, and a revocation
    /// is listed for as long as the token it was made with.
    #[serde(default)]
    access_until: u64,
}

impl StoredSession {
    fn deadline_ms(&self) -> u64 {
        self.record
            .expires_at
            .max(self.access_until)
            .saturating_mul(1000)
    }

    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        encode(self.deadline_ms(), self, &[])
    }
}

#[derive(Serialize, serde::Deserialize)]
struct RefreshMeta {
    sid: String,
    /// Unix seconds; set once the token has been rotated, and the record's blob is then the
    /// sealed successor.
    rotated_at: Option<u64>,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// `Some` for the store's whole life: taken only by `Drop`, to stop the writer thread.
    writer: Option<Writer>,
}

struct Writer {
    jobs: mpsc::UnboundedSender<Box<dyn Job>>,
    thread: JoinHandle<()>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`. Fails at once, without waiting, when another
    /// process (or another store in this one) has the file open: two writers would each believe
    /// their own view of sessions and revocations.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|err| match err {
                DatabaseError::DatabaseAlreadyOpen => StoreError(format!(
                    "{} is in use by another process (is another wxgate running with this \
                     store.path?); give each instance its own file, or use backend \"redis\" \
                     to share sessions between instances",
                    path.display()
                )),
                other => StoreError(format!("cannot open {}: {other}", path.display())),
            })?;
        // Every table exists from the start, so that reads never meet a missing one.
        let txn = db.begin_write().map_err(failed)?;
        Tables::open(&txn)?;
        txn.commit().map_err(failed)?;

        let db = Arc::new(db);
        let (jobs, queue) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("wxgate-store-writer".into())
            .spawn({
                let db = db.clone();
                move || write_batches(&db, queue)
            })
            .map_err(|err| StoreError(format!("cannot start the store's writer thread: {err}")))?;
        Ok(EmbeddedStore {
            db,
            writer: Some(Writer { jobs, thread }),
        })
    }

    /// Runs `read` on a blocking thread in a read transaction: a consistent snapshot.
    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&ReadTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || read(&db.begin_read().map_err(failed)?))
            .await
            .map_err(|_| StoreError("embedded store: a read was cancelled".into()))?
    }

    /// Hands `write` to the writer thread, and answers once the transaction it joined has
    /// committed. `write` may run twice (see [`Job`]), so it only reads what it captured.
    async fn write<R: Send + 'static>(
        &self,
        write: impl FnMut(&mut Tables<'_>, u64) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let stopped = || StoreError("embedded store: the writer thread has stopped".into());
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Write {
            write,
            result: None,
            reply,
        });
        self.writer
            .as_ref()
            .ok_or_else(stopped)?
            .jobs
            .send(job)
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for EmbeddedStore {
    /// Waits for the writer to finish what it was given, so that the file is released (and can
    /// be opened again) as soon as the store is gone.
    fn drop(&mut self) {
        if let Some(Writer { jobs, thread }) = self.writer.take() {
            drop(jobs);
            // A writer that panicked has nothing left to finish; the panic was reported then.
            let _ = thread.join();
        }
    }
}

/// A write waiting for the writer thread. When a batch fails, each of its writes is retried in
/// a transaction of its own, so that one bad record fails only the request that met it: hence
/// `apply` may run twice, the first time in a transaction that was then thrown away.
trait Job: Send {
    fn apply(&mut self, tables: &mut Tables<'_>, now_ms: u64) -> Result<(), StoreError>;
    /// Tells the caller how its write ended once its transaction has, or has failed.
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Write<F, R> {
    write: F,
    result: Option<R>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Job for Write<F, R>
where
    F: FnMut(&mut Tables<'_>, u64) -> Result<R, StoreError> + Send,
    R: Send,
{
    fn apply(&mut self, tables: &mut Tables<'_>, now_ms: u64) -> Result<(), StoreError> {
        self.result = Some((self.write)(tables, now_ms)?);
        Ok(())
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let Write { result, reply, .. } = *self;
        let outcome = committed.and_then(|()| {
            result.ok_or_else(|| StoreError("embedded store: a write was not applied".into()))
        });
        // The caller may be gone (its request was cancelled); its write stands all the same.
        let _ = reply.send(outcome);
    }
}

/// The writer thread: commits what is queued, in batches, until the store is dropped.
fn write_batches(db: &Database, mut queue: mpsc::UnboundedReceiver<Box<dyn Job>>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match commit(db, &mut batch) {
            Ok(()) => batch.into_iter().for_each(|job| job.finish(Ok(()))),
            Err(_) if batch.len() > 1 => {
                for mut job in batch {
                    let committed = commit(db, std::slice::from_mut(&mut job));
                    job.finish(committed);
                }
            }
            Err(err) => batch
                .into_iter()
                .for_each(|job| job.finish(Err(StoreError(err.0.clone())))),
        }
    }
}

/// Applies `jobs` in one write transaction, after sweeping a share of the expired entries.
/// Dropping the transaction on an error aborts it: nothing of the batch is kept.
fn commit(db: &Database, jobs: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    let now_ms = unix_ms();
    let txn = db.begin_write().map_err(failed)?;
    {
        let mut tables = Tables::open(&txn)?;
        tables.sweep(now_ms, jobs.len() * SWEEP_PER_WRITE)?;
        for job in jobs.iter_mut() {
            job.apply(&mut tables, now_ms)?;
        }
    }
    txn.commit().map_err(failed)
}

/// Every table, opened once per write transaction and shared by the writes batched in it.
struct Tables<'t> {
    session_keys: Table<'t, (&'static str, &'static str), &'static str>,
    sessions: Table<'t, &'static str, &'static [u8]>,
    refresh: Table<'t, &'static Digest, &'static [u8]>,
    revoked: Table<'t, u64, &'static [u8]>,
    exchanges: Table<'t, &'static Digest, &'static [u8]>,
    expiry: Table<'t, (u64, u8, &'static [u8]), ()>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, StoreError> {
        Ok(Tables {
            session_keys: txn.open_table(SESSION_KEYS).map_err(failed)?,
            sessions: txn.open_table(SESSIONS).map_err(failed)?,
            refresh: txn.open_table(REFRESH).map_err(failed)?,
            revoked: txn.open_table(REVOKED).map_err(failed)?,
            exchanges: txn.open_table(EXCHANGES).map_err(failed)?,
            expiry: txn.open_table(EXPIRY).map_err(failed)?,
            meta: txn.open_table(META).map_err(failed)?,
        })
    }

    /// Indexes an expiring entry by its deadline, for [`Tables::sweep`].
    fn expire_at(&mut self, deadline_ms: u64, kind: u8, key: &[u8]) -> Result<(), StoreError> {
        self.expiry
            .insert((deadline_ms, kind, key), ())
            .map(drop)
            .map_err(failed)
    }

    /// Removes up to `budget` entries whose deadline has passed. An index entry can be stale
    /// (its entry was removed, or rewritten with a later deadline): then only the index entry
    /// goes. A record too damaged to read its deadline from goes too, since it could only ever
    /// fail the requests that meet it.
    fn sweep(&mut self, now_ms: u64, budget: usize) -> Result<(), StoreError> {
        for _ in 0..budget {
            let Some((deadline_ms, kind, key)) =
                self.expiry.first().map_err(failed)?.map(|(entry, _)| {
                    let (deadline_ms, kind, key) = entry.value();
                    (deadline_ms, kind, key.to_vec())
                })
            else {
                return Ok(());
            };
            if deadline_ms > now_ms {
                return Ok(());
            }
            self.expiry
                .remove((deadline_ms, kind, key.as_slice()))
                .map_err(failed)?;
            self.remove_if_expired(kind, &key, now_ms)?;
        }
        Ok(())
    }

    fn remove_if_expired(&mut self, kind: u8, key: &[u8], now_ms: u64) -> Result<(), StoreError> {
        let expired = |value: Option<AccessGuard<'_, &[u8]>>| {
            value.is_some_and(|value| deadline(value.value()).is_none_or(|at| at <= now_ms))
        };
        match kind {
            kind::SESSION => {
                if let Ok(sid) = std::str::from_utf8(key)
                    && expired(self.sessions.get(sid).map_err(failed)?)
                {
                    self.sessions.remove(sid).map_err(failed)?;
                }
            }
            kind::REFRESH => {
                if let Ok(digest) = Digest::try_from(key)
                    && expired(self.refresh.get(&digest).map_err(failed)?)
                {
                    self.refresh.remove(&digest).map_err(failed)?;
                }
            }
            kind::REVOKED => {
                if let Ok(seq) = <[u8; 8]>::try_from(key).map(u64::from_be_bytes)
                    && expired(self.revoked.get(seq).map_err(failed)?)
                {
                    self.revoked.remove(seq).map_err(failed)?;
                }
            }
            kind::EXCHANGE => {
                if let Ok(digest) = Digest::try_from(key)
                    && expired(self.exchanges.get(&digest).map_err(failed)?)
                {
                    self.exchanges.remove(&digest).map_err(failed)?;
                }
            }
            kind::LOGIN => {
                if let Some((refresh, sid)) = key.split_first_chunk::<32>() {
                    self.remove_if_expired(kind::REFRESH, refresh, now_ms)?;
                    self.remove_if_expired(kind::SESSION, sid, now_ms)?;
                }
            }
            // An index entry no version of this file writes: nothing to remove but itself.
            _ => {}
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn put_session_key(
        &self,
        appid: &str,
        openid: &str,
        session_key: &Secret,
    ) -> Result<(), StoreError> {
        let (appid, openid) = (appid.to_string(), openid.to_string());
        let session_key = session_key.clone();
        self.write(move |tables, _| {
            tables
                .session_keys
                .insert((appid.as_str(), openid.as_str()), session_key.expose())
                .map(drop)
                .map_err(failed)
        })
        .await
    }

    async fn session_key(&self, appid: &str, openid: &str) -> Result<Option<Secret>, StoreError> {
        let (appid, openid) = (appid.to_string(), openid.to_string());
        self.read(move |txn| {
            let table = txn.open_table(SESSION_KEYS).map_err(failed)?;
            let session_key = table
                .get((appid.as_str(), openid.as_str()))
                .map_err(failed)?;
            Ok(session_key.map(|session_key| Secret::new(session_key.value())))
        })
        .await
    }

    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh: Digest,
        access_until: u64,
    ) -> Result<(), StoreError> {
        let stored = StoredSession {
            record: session.clone(),
            access_until,
        };
        let session_deadline_ms = stored.deadline_ms();
        let record = stored.encode()?;
        let sid = session.sid.clone();
        let refresh_deadline_ms = session.expires_at.saturating_mul(1000);
        let refresh_entry = encode(
            refresh_deadline_ms,
            &RefreshMeta {
                sid: sid.clone(),
                rotated_at: None,
            },
            &[],
        )?;
        let login = [refresh.as_slice(), sid.as_bytes()].concat();
        self.write(move |tables, _| {
            tables
                .sessions
                .insert(sid.as_str(), record.as_slice())
                .map_err(failed)?;
            tables
                .refresh
                .insert(&refresh, refresh_entry.as_slice())
                .map_err(failed)?;
            // Each is removed once past its own deadline: the later one is when both are.
            let deadline_ms = session_deadline_ms.max(refresh_deadline_ms);
            tables.expire_at(deadline_ms, kind::LOGIN, &login)
        })
        .await
    }

    async fn refresh_session(
        &self,
        refresh: Digest,
        now: u64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.read(move |txn| {
            let tokens = txn.open_table(REFRESH).map_err(failed)?;
            let sessions = txn.open_table(SESSIONS).map_err(failed)?;
            Ok(find_refresh(&tokens, &sessions, &refresh, now)?.map(|(_, session)| session.record))
        })
        .await
    }

    async fn rotate_refresh(
        &self,
        old: Digest,
        new: Digest,
        sealed_successor: &[u8],
        access_until: u64,
        now: u64,
    ) -> Result<Rotation, StoreError> {
        let sealed_successor = sealed_successor.to_vec();
        self.write(move |tables, _| {
            let Some((entry, mut stored)) =
                find_refresh(&tables.refresh, &tables.sessions, &old, now)?
            else {
                return Ok(Rotation::Unknown);
            };
            if let Some(rotated_at) = entry.meta.rotated_at {
                return Ok(Rotation::AlreadyRotated {
                    session: stored.record,
                    age_secs: now.saturating_sub(rotated_at),
                    sealed_successor: entry.blob,
                });
            }
            if access_until > stored.access_until {
                stored.access_until = access_until;
                tables
                    .sessions
                    .insert(stored.record.sid.as_str(), stored.encode()?.as_slice())
                    .map_err(failed)?;
                tables.expire_at(
                    stored.deadline_ms(),
                    kind::SESSION,
                    stored.record.sid.as_bytes(),
                )?;
            }
            let session = stored.record;
            let deadline_ms = session.expires_at.saturating_mul(1000);
            let rotated = encode(
                deadline_ms,
                &RefreshMeta {
                    sid: session.sid.clone(),
                    rotated_at: Some(now),
                },
                &sealed_successor,
            )?;
            let current = encode(
                deadline_ms,
                &RefreshMeta {
                    sid: session.sid.clone(),
                    rotated_at: None,
                },
                &[],
            )?;
            tables
                .refresh
                .insert(&old, rotated.as_slice())
                .map_err(failed)?;
            tables
                .refresh
                .insert(&new, current.as_slice())
                .map_err(failed)?;
            tables.expire_at(deadline_ms, kind::REFRESH, &new)?;
            Ok(Rotation::Rotated)
        })
        .await
    }

    /// Removing the session is what stops its refresh tokens: each names its session, and one
    /// whose session is gone is unknown. They stay until their deadline, when the sweep takes
    /// them, rather than being looked for now.
    async fn revoke_session(&self, sid: &str, until: u64) -> Result<u64, StoreError> {
        let sid = sid.to_string();
        self.write(move |tables, _| {
            let recorded = match tables.sessions.remove(sid.as_str()).map_err(failed)? {
                Some(value) => decode::<StoredSession>(value.value())?.meta.access_until,
                None => 0,
            };
            let until = until.max(recorded);
            let last = tables.meta.get(REVOCATION_SEQ).map_err(failed)?;
            let seq = last.map_or(0, |seq| seq.value()) + 1;
            tables.meta.insert(REVOCATION_SEQ, seq).map_err(failed)?;
            let until_ms = until.saturating_mul(1000);
            tables
                .revoked
                .insert(seq, encode(until_ms, &sid, &[])?.as_slice())
                .map_err(failed)?;
            tables.expire_at(until_ms, kind::REVOKED, &seq.to_be_bytes())?;
            Ok(until)
        })
        .await
    }

    async fn revoked_since(&self, cursor: u64) -> Result<(Vec<Revoked>, u64), StoreError> {
        self.read(move |txn| {
            let now_ms = unix_ms();
            let meta = txn.open_table(META).map_err(failed)?;
            let last = meta.get(REVOCATION_SEQ).map_err(failed)?;
            let seq = last.map_or(0, |seq| seq.value());
            let revoked = txn.open_table(REVOKED).map_err(failed)?;
            let mut listed = Vec::new();
            for entry in revoked
                .range((Bound::Excluded(cursor), Bound::Unbounded))
                .map_err(failed)?
            {
                let (_, value) = entry.map_err(failed)?;
                let record: Record<String> = decode(value.value())?;
                if record.deadline_ms > now_ms {
                    listed.push(Revoked {
                        sid: record.meta,
                        until: record.deadline_ms.div_ceil(1000),
                    });
                }
            }
            Ok((listed, seq))
        })
        .await
    }

    async fn claim_exchange(
        &self,
        code: Digest,
        ttl: Duration,
    ) -> Result<ExchangeClaim, StoreError> {
        self.write(move |tables, now_ms| {
            if let Some(value) = tables.exchanges.get(&code).map_err(failed)? {
                let record: Record<bool> = decode(value.value())?;
                if record.deadline_ms > now_ms {
                    return Ok(if record.meta {
                        ExchangeClaim::Done(record.blob)
                    } else {
                        ExchangeClaim::Theirs
                    });
                }
            }
            let until_ms = after(now_ms, ttl);
            let claim = encode(until_ms, &false, &[])?;
            tables
                .exchanges
                .insert(&code, claim.as_slice())
                .map_err(failed)?;
            tables.expire_at(until_ms, kind::EXCHANGE, &code)?;
            Ok(ExchangeClaim::Mine)
        })
        .await
    }

    async fn finish_exchange(
        &self,
        code: Digest,
        sealed_outcome: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let sealed_outcome = sealed_outcome.to_vec();
        self.write(move |tables, now_ms| {
            let until_ms = after(now_ms, ttl);
            let done = encode(until_ms, &true, &sealed_outcome)?;
            tables
                .exchanges
                .insert(&code, done.as_slice())
                .map_err(failed)?;
            tables.expire_at(until_ms, kind::EXCHANGE, &code)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self
            .writer
            .as_ref()
            .is_none_or(|writer| writer.jobs.is_closed())
        {
            return Err(StoreError(
                "embedded store: the writer thread has stopped".into(),
            ));
        }
        self.read(|txn| txn.open_table(META).map(drop).map_err(failed))
            .await
    }
}

/// The refresh entry named `name` and its session, when that session is live at `now`.
fn find_refresh(
    tokens: &impl ReadableTable<&'static Digest, &'static [u8]>,
    sessions: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &Digest,
    now: u64,
) -> Result<Option<(Record<RefreshMeta>, StoredSession)>, StoreError> {
    let Some(entry) = tokens.get(name).map_err(failed)? else {
        return Ok(None);
    };
    let entry: Record<RefreshMeta> = decode(entry.value())?;
    let Some(session) = sessions.get(entry.meta.sid.as_str()).map_err(failed)? else {
        return Ok(None);
    };
    let session: StoredSession = decode(session.value())?.meta;
    Ok((session.record.expires_at > now).then_some((entry, session)))
}

/// An expiring value as stored: `[deadline: u64 LE, unix ms][meta length: u32 LE][meta: JSON]
/// [blob]`. The deadline leads, so that the sweep reads nothing else; the blob (a sealed
/// successor, an exchange's sealed outcome) is kept as it is, where JSON would spell out each
/// byte as a number.
struct Record<M> {
    deadline_ms: u64,
    meta: M,
    blob: Vec<u8>,
}

fn encode<M: Serialize>(deadline_ms: u64, meta: &M, blob: &[u8]) -> Result<Vec<u8>, StoreError> {
    let meta = serde_json::to_vec(meta)
        .map_err(|err| StoreError(format!("embedded store: cannot encode a record: {err}")))?;
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| StoreError("embedded store: a record is too large".into()))?;
    let mut value = Vec::with_capacity(12 + meta.len() + blob.len());
    value.extend_from_slice(&deadline_ms.to_le_bytes());
    value.extend_from_slice(&meta_len.to_le_bytes());
    value.extend_from_slice(&meta);
    value.extend_from_slice(blob);
    Ok(value)
}

fn decode<M: DeserializeOwned>(value: &[u8]) -> Result<Record<M>, StoreError> {
    let (deadline_ms, rest) = value.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (meta_len, rest) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
    let meta_len = usize::try_from(u32::from_le_bytes(*meta_len)).map_err(|_| corrupt())?;
    let (meta, blob) = rest.split_at_checked(meta_len).ok_or_else(corrupt)?;
    Ok(Record {
        deadline_ms: u64::from_le_bytes(*deadline_ms),
        meta: serde_json::from_slice(meta).map_err(|_| corrupt())?,
        blob: blob.to_vec(),
    })
}

fn deadline(value: &[u8]) -> Option<u64> {
    value.first_chunk::<8>().copied().map(u64::from_le_bytes)
}

fn corrupt() -> StoreError {
    StoreError("embedded store: a stored record is corrupt".into())
}

fn failed(err: impl Into<redb::Error>) -> StoreError {
    StoreError(format!("embedded store: {}", err.into()))
}

/// Wall-clock milliseconds, not an `Instant`: deadlines must mean the same after a restart.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn after(now_ms: u64, period: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(period.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use redb::ReadableTableMetadata;

    use super::*;
    use crate::token::unix_now;

    /// A store on a fresh file whose folder is removed at once: the open file lives on,
    /// unnamed, until the store closes it.
    fn store() -> EmbeddedStore {
        let dir =
            std::env::temp_dir().join(format!("wxgate-embedded-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = EmbeddedStore::open(&dir.join("wxgate.redb")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        store
    }

    fn session(sid: &str, expires_at: u64) -> SessionRecord {
        SessionRecord {
            sid: sid.into(),
            appid: "wx1".into(),
            openid: "o-1".into(),
            unionid: None,
            claims: serde_json::Map::new(),
            expires_at,
        }
    }

    fn len<K: redb::Key + 'static, V: redb::Value + 'static>(
        store: &EmbeddedStore,
        table: TableDefinition<K, V>,
    ) -> u64 {
        let txn = store.db.begin_read().unwrap();
        txn.open_table(table).unwrap().len().unwrap()
    }

    #[tokio::test]
    async fn expired_entries_are_swept_by_later_writes() {
        let store = store();
        store
            .create_session(&session("s-old", unix_now() - 10), [1; 32], unix_now() - 5)
            .await
            .unwrap();
        store
            .revoke_session("s-gone", unix_now() - 1)
            .await
            .unwrap();
        store.claim_exchange([2; 32], Duration::ZERO).await.unwrap();
        store
            .put_session_key("wx1", "o-1", &Secret::new("sk"))
            .await
            .unwrap();

        assert_eq!(len(&store, SESSIONS), 0);
        assert_eq!(len(&store, REFRESH), 0);
        assert_eq!(len(&store, REVOKED), 0);
        assert_eq!(len(&store, EXCHANGES), 0);
        assert_eq!(len(&store, EXPIRY), 0);
        assert_eq!(len(&store, SESSION_KEYS), 1);
        // The sequence outlives the revocations it numbered.
        assert_eq!(store.revoked_since(0).await.unwrap(), (vec![], 1));
    }

    #[tokio::test]
    async fn a_stale_index_entry_leaves_a_rewritten_entry_alone() {
        let store = store();
        let code = [3; 32];
        store
            .claim_exchange(code, Duration::from_millis(20))
            .await
            .unwrap();
        store
            .finish_exchange(code, b"outcome", Duration::from_secs(60))
            .await
            .unwrap();
        // Waiting out the claim's deadline is the point: its index entry must come due.
        tokio::time::sleep(Duration::from_millis(40)).await;
        store
            .put_session_key("wx1", "o-1", &Secret::new("sk"))
            .await
            .unwrap();

        assert_eq!(len(&store, EXPIRY), 1);
        assert_eq!(
            store
                .claim_exchange(code, Duration::from_secs(60))
                .await
                .unwrap(),
            ExchangeClaim::Done(b"outcome".to_vec())
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_is_an_error_not_a_panic() {
        let store = store();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(REFRESH)
            .unwrap()
            .insert(&[4; 32], &b"\x01\x02"[..])
            .unwrap();
        txn.commit().unwrap();

        assert!(store.refresh_session([4; 32], unix_now()).await.is_err());
        // Sent together, the two writes most likely share a commit: only the one that met the
        // record fails, either way.
        let session_key = Secret::new("sk");
        let (rotation, put) = tokio::join!(
            store.rotate_refresh([4; 32], [5; 32], b"", unix_now(), unix_now()),
            store.put_session_key("wx1", "o-1", &session_key),
        );
        assert!(rotation.is_err());
        put.unwrap();
        assert_eq!(
            store
                .session_key("wx1", "o-1")
                .await
                .unwrap()
                .unwrap()
                .expose(),
            "sk"
        );
    }
}

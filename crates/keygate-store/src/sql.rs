//! One store over both databases.
//!
//! sqlx's `Any` driver runs the same statements on SQLite and on PostgreSQL, so every method
//! exists once. Placeholders are written `$1`, `$2`, …: PostgreSQL's own form, which sqlx's
//! SQLite driver also binds by number. The statements use only SQL both databases read
//! (`CASE` instead of `MIN`/`LEAST`, `LIKE` instead of `instr`/`strpos`, `CAST(… AS TEXT)`);
//! what still differs is in [`Backend`]: the migrations, how a write transaction begins, and
//! the change feed (PostgreSQL's LISTEN/NOTIFY).
//!
//! Why `Any` rather than a store generic over the database: sqlx's bounds on a generic
//! executor (`Encode` and `Type` per bound value, `IntoArguments`, `for<'c> &'c mut
//! Connection: Executor`) are not implied by a trait, so they would be repeated on every
//! impl; that is what the macro bodies this replaced existed to avoid. The cost is a value
//! conversion per bound argument and per returned column (see docs/performance.md).

use crate::Result;
use sqlx::any::{AnyArguments, AnyPoolOptions};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Any, AnyPool, Arguments, ConnectOptions, Connection, Encode, Executor, FromRow, Type};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The LISTEN/NOTIFY channel that carries cache invalidations between nodes.
const CHANNEL: &str = "keygate_changes";

/// Which database a [`SqlStore`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One file, one node (WAL mode).
    Sqlite,
    /// Shared by many nodes.
    Postgres,
}

impl Backend {
    /// How a transaction that will write begins. SQLite's must hold the write lock from its
    /// first statement (`BEGIN IMMEDIATE`): a deferred one that reads first and writes later
    /// cannot upgrade its lock once another connection (the audit shipper, the last-used
    /// writer) has written meanwhile, and SQLite answers `SQLITE_BUSY` at once, past
    /// `busy_timeout`, so the call would fail with 503. PostgreSQL locks rows as it writes.
    fn begin_write(self) -> &'static str {
        match self {
            Self::Sqlite => "BEGIN IMMEDIATE",
            Self::Postgres => "BEGIN",
        }
    }

    fn migrations(self) -> &'static sqlx::migrate::Migrator {
        match self {
            Self::Sqlite => &SQLITE_MIGRATIONS,
            Self::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// keygate's store on SQLite or PostgreSQL: every trait of this crate, implemented once.
#[derive(Clone)]
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    backend: Backend,
    /// Where PostgreSQL's change feed connects (the pool's URL); `None` on SQLite.
    listen_url: Option<String>,
    /// SQLite: one write transaction at a time, queued here in order. SQLite has one write
    /// lock; a connection that finds it taken sleeps in its busy handler (1, 2, 5 … 100 ms
    /// steps), so writers racing for it waited up to 100 ms for a lock freed in one. Queued
    /// here, the next writer starts the moment the last one commits.
    write_gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// A write transaction (see [`SqlStore::begin_write`]): derefs to its connection, holds the
/// SQLite write gate until it is committed or dropped.
pub(crate) struct WriteTx {
    tx: sqlx::Transaction<'static, Any>,
    _gate: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// Commits, then lets the next writer in.
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl std::fmt::Debug for SqlStore {
    // Not derived: the URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Opens (creating if missing) the SQLite database at `url` (`sqlite://keygate.db`,
    /// `sqlite:///abs/path.db`) in WAL mode.
    pub async fn sqlite(url: &str) -> Result<Self> {
        // Creating the file and WAL mode persist in the file, so one typed connection sets
        // them; the per-connection settings are applied to each pooled connection below.
        SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .connect()
            .await?
            .close()
            .await?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            // A file on this machine, not a server that may have hung up: checking each
            // connection before use only costs a round trip to its thread.
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL; \
                         PRAGMA foreign_keys = ON",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
            listen_url: None,
            write_gate: Some(Arc::new(tokio::sync::Mutex::new(()))),
        })
    }

    /// Connects to PostgreSQL at `url` (`postgres://user@host:5432/db`) with a pool of
    /// `max_connections`; a connection is waited for at most `acquire_timeout`.
    pub async fn postgres(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            .connect(url)
            .await?;
        Ok(Self {
            pool,
            backend: Backend::Postgres,
            listen_url: Some(url.to_owned()),
            write_gate: None,
        })
    }

    /// The underlying pool (for tests and tools).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A transaction for work that writes (see [`Backend::begin_write`] for why SQLite's
    /// differs).
    pub(crate) async fn begin_write(&self) -> std::result::Result<WriteTx, sqlx::Error> {
        let gate = self.write_gate().await?;
        let tx = self.pool.begin_with(self.backend.begin_write()).await?;
        Ok(WriteTx { tx, _gate: gate })
    }

    /// SQLite's write gate (see `write_gate`), for writes made of single statements outside a
    /// transaction; `None` on PostgreSQL.
    /// A writer waits for its turn at most as long as SQLite's `busy_timeout` would have let
    /// it, then fails (503) rather than queue without end behind a stalled one.
    pub(crate) async fn write_gate(
        &self,
    ) -> std::result::Result<Option<tokio::sync::OwnedMutexGuard<()>>, sqlx::Error> {
        let Some(g) = &self.write_gate else {
            return Ok(None);
        };
        tokio::time::timeout(Duration::from_secs(5), g.clone().lock_owned())
            .await
            .map(Some)
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    /// The one row `sql` (a statement with one placeholder, `$1`) finds for `value`, decoded.
    pub(crate) async fn row_where<T>(
        &self,
        sql: &'static str,
        value: &str,
        decode: fn(&sqlx::any::AnyRow) -> Result<T>,
    ) -> Result<Option<T>> {
        let row = sqlx::query(sql)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Applies the backend's pending migrations.
    pub(crate) async fn run_migrations(&self) -> Result<()> {
        self.backend.migrations().run(&self.pool).await?;
        Ok(())
    }

    /// Tells every node on this PostgreSQL database about a change; nothing on SQLite.
    pub(crate) async fn notify(&self, change: &str) -> Result<()> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(change)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The change feed: PostgreSQL's LISTEN on its own connection; none on SQLite.
    pub(crate) async fn listen(&self) -> Result<Option<Box<dyn crate::ChangeFeed>>> {
        let Some(url) = &self.listen_url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(Box::new(PgFeed { listener })))
    }
}

/// Changes from other nodes, over PostgreSQL LISTEN/NOTIFY.
struct PgFeed {
    listener: sqlx::postgres::PgListener,
}

#[async_trait::async_trait]
impl crate::ChangeFeed for PgFeed {
    async fn next(&mut self) -> Result<Option<String>> {
        // `try_recv` answers `None` once when the connection dropped; the next call reconnects.
        Ok(self
            .listener
            .try_recv()
            .await?
            .map(|n| n.payload().to_owned()))
    }
}

/// A statement built piece by piece, with `$N` placeholders for both backends. sqlx's
/// `QueryBuilder<Any>` writes `?`, which PostgreSQL does not read; this one keeps its method
/// names.
pub(crate) struct Sql<'a> {
    text: String,
    args: std::result::Result<AnyArguments<'a>, sqlx::error::BoxDynError>,
}

impl<'a> Sql<'a> {
    /// A statement that begins with `text`.
    pub(crate) fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            args: Ok(AnyArguments::default()),
        }
    }

    /// Appends SQL text.
    pub(crate) fn push(&mut self, text: impl std::fmt::Display) -> &mut Self {
        // Writing to a String cannot fail.
        let _ = write!(self.text, "{text}");
        self
    }

    /// Appends a placeholder bound to `value`.
    pub(crate) fn push_bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'a + Encode<'a, Any> + Type<Any>,
    {
        if let Ok(args) = &mut self.args {
            match args.add(value) {
                Ok(()) => {
                    let n = args.len();
                    self.push(format_args!("${n}"));
                }
                // Kept for `build`: the statement then fails with it instead of running.
                Err(e) => self.args = Err(e),
            }
        }
        self
    }

    /// Appends keyset pagination over `id_col`: rows before the page's cursor, newest first,
    /// at most its limit.
    pub(crate) fn page(&mut self, id_col: &str, page: &'a crate::PageRequest) -> &mut Self {
        if let Some(c) = &page.cursor {
            self.push(format_args!(" AND {id_col} < "))
                .push_bind(c.as_str());
        }
        self.push(format_args!(" ORDER BY {id_col} DESC LIMIT "))
            .push_bind(i64::from(page.limit))
    }

    /// Appends `VALUES (…), (…)`, one group per item; `row` binds an item's values.
    pub(crate) fn push_values<I, F>(&mut self, items: I, mut row: F) -> &mut Self
    where
        I: IntoIterator,
        F: FnMut(Values<'_, 'a>, I::Item),
    {
        self.push("VALUES ");
        for (i, item) in items.into_iter().enumerate() {
            self.push(if i == 0 { "(" } else { ", (" });
            row(
                Values {
                    sql: self,
                    first: true,
                },
                item,
            );
            self.push(")");
        }
        self
    }

    /// The arguments bound so far; an argument that could not be encoded fails the statement
    /// here instead of running it.
    fn arguments(&mut self) -> Result<AnyArguments<'a>> {
        std::mem::replace(&mut self.args, Ok(AnyArguments::default()))
            .map_err(|e| sqlx::Error::Encode(e).into())
    }

    /// The statement, ready to run.
    pub(crate) fn build(&mut self) -> Result<Query<'_, Any, AnyArguments<'_>>> {
        let args = self.arguments()?;
        Ok(sqlx::query_with(&self.text, args))
    }

    /// The statement, its rows read as `T`.
    pub(crate) fn build_query_as<T>(&mut self) -> Result<QueryAs<'_, Any, T, AnyArguments<'_>>>
    where
        T: for<'r> FromRow<'r, sqlx::any::AnyRow>,
    {
        let args = self.arguments()?;
        Ok(sqlx::query_as_with(&self.text, args))
    }

    /// The statement, its rows' first column read as `T`.
    pub(crate) fn build_query_scalar<T>(
        &mut self,
    ) -> Result<QueryScalar<'_, Any, T, AnyArguments<'_>>>
    where
        (T,): for<'r> FromRow<'r, sqlx::any::AnyRow>,
    {
        let args = self.arguments()?;
        Ok(sqlx::query_scalar_with(&self.text, args))
    }
}

/// One `VALUES` group: `push_bind` separates its values with commas.
pub(crate) struct Values<'s, 'a> {
    sql: &'s mut Sql<'a>,
    first: bool,
}

impl<'a> Values<'_, 'a> {
    /// Appends the next value of the group.
    pub(crate) fn push_bind<T>(&mut self, value: T) -> &mut Self
    where
        T: 'a + Encode<'a, Any> + Type<Any>,
    {
        if !std::mem::take(&mut self.first) {
            self.sql.push(", ");
        }
        self.sql.push_bind(value);
        self
    }
}

/// `needle` as a `LIKE … ESCAPE '\'` pattern matching any text that contains it.
pub(crate) fn contains_pattern(needle: &str) -> String {
    let mut p = String::with_capacity(needle.len() + 2);
    p.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_and_values_are_grouped() {
        let mut q = Sql::new("INSERT INTO t (a, b) ");
        q.push_values([(1_i64, "x"), (2, "y")], |mut v, (a, b)| {
            v.push_bind(a).push_bind(b);
        });
        q.push(" WHERE c = ").push_bind(3_i64);
        assert_eq!(
            q.text,
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) WHERE c = $5"
        );
    }

    #[test]
    fn like_patterns_escape_their_wildcards() {
        assert_eq!(contains_pattern("a%b_c\\d"), "%a\\%b\\_c\\\\d%");
    }
}

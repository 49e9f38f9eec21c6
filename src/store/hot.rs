//! Connections for the per-message statements, kept between uses instead of going back to the
//! pool after each.
//!
//! sqlx 0.8 pings every connection it takes back into its pool (`PoolConnection`'s release runs a
//! `Sync` and waits for `ReadyForQuery`), and no pool option turns that off. A message runs six
//! statements, each on a connection taken from the pool and given back: six extra round trips per
//! message, ~9 % of the worker's CPU (BENCHMARKS.md). The statements a message runs therefore take
//! their connection from a small stash first ([`Stash`]) and put it back there after a statement
//! that succeeded; the pool still opens, limits and (on acquire after 30 s idle) checks them.
//!
//! What goes back to the pool instead, and is checked by its ping there:
//! - a connection whose statement failed (it may be broken, or mid-way through a cancelled
//!   exchange: a stage that timed out drops the statement's future, and the guard with it);
//! - a connection beyond the stash's capacity, which leaves the pool room for everything else
//!   (the spool poll, the knowledge workers, the admin API);
//! - a connection idle in the stash for [`MAX_IDLE`], so that a quiet process holds no more
//!   connections than the pool's own idle rules allow;
//! - everything once the pool is closed, so that `Pool::close` (which waits for every connection
//!   to come back) completes.

use std::{
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use sqlx::{PgConnection, PgPool, Postgres, pool::PoolConnection};

/// A stashed connection unused for this long goes back to the pool.
pub(super) const MAX_IDLE: Duration = Duration::from_secs(10);

/// How often the stash is swept for idle connections and a closed pool.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Connections kept for the next statement, most recently used last.
#[derive(Debug)]
pub(super) struct Stash {
    capacity: usize,
    idle: Mutex<Vec<(Instant, PoolConnection<Postgres>)>>,
}

impl Stash {
    /// A stash of at most `capacity` connections of `pool`, swept in the background when a Tokio
    /// runtime is there to run the sweep (without one, idle connections go back on the next use).
    pub(super) fn new(pool: &PgPool, capacity: usize) -> Arc<Self> {
        let stash = Arc::new(Self { capacity, idle: Mutex::new(Vec::new()) });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&stash), pool.clone()));
        }
        stash
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, PoolConnection<Postgres>)>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used connection that has not been idle too long.
    fn take(&self) -> Option<PoolConnection<Postgres>> {
        let mut idle = self.lock();
        let (since, conn) = idle.pop()?;
        if since.elapsed() < MAX_IDLE {
            return Some(conn);
        }
        // The older ones further down are staler still: all of them go back to the pool (dropped
        // outside the lock).
        let mut stale = std::mem::take(&mut *idle);
        stale.push((since, conn));
        drop(idle);
        drop(stale);
        None
    }

    fn put(&self, conn: PoolConnection<Postgres>, pool_closed: bool) {
        let mut idle = self.lock();
        if pool_closed || idle.len() >= self.capacity {
            drop(idle);
            drop(conn);
            return;
        }
        idle.push((Instant::now(), conn));
    }

    /// Gives back to the pool the connections idle too long, or all of them.
    fn release(&self, all: bool) {
        let released: Vec<_> = {
            let mut idle = self.lock();
            let keep_from =
                if all { idle.len() } else { idle.iter().take_while(|(s, _)| s.elapsed() >= MAX_IDLE).count() };
            idle.drain(..keep_from).collect()
        };
        drop(released);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

async fn sweep(stash: Weak<Stash>, pool: PgPool) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(stash) = stash.upgrade() else { return };
        let closed = pool.is_closed();
        stash.release(closed);
        if closed {
            return;
        }
    }
}

/// A connection for one statement: from the stash, else from the pool. Call
/// [`HotConnection::keep`] once the statement succeeded to stash it again; dropped otherwise, it
/// goes back to the pool, which checks it.
pub(super) struct HotConnection {
    stash: Arc<Stash>,
    pool_closed: bool,
    conn: Option<PoolConnection<Postgres>>,
}

impl HotConnection {
    pub(super) async fn acquire(stash: &Arc<Stash>, pool: &PgPool) -> Result<Self, sqlx::Error> {
        let conn = match stash.take() {
            Some(conn) => conn,
            None => pool.acquire().await?,
        };
        Ok(Self { stash: stash.clone(), pool_closed: pool.is_closed(), conn: Some(conn) })
    }

    /// The statement succeeded: the connection is ready for the next one.
    pub(super) fn keep(mut self) {
        if let Some(conn) = self.conn.take() {
            self.stash.put(conn, self.pool_closed);
        }
    }
}

impl Deref for HotConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Only `keep` (which consumes the guard) takes the connection out.
        self.conn.as_deref().expect("a hot connection holds its connection until kept")
    }
}

impl DerefMut for HotConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().expect("a hot connection holds its connection until kept")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDatabase;

    /// The backend pid of a connection: the same pid means the same connection.
    async fn pid(conn: &mut PgConnection) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(conn).await.unwrap()
    }

    #[tokio::test]
    async fn a_kept_connection_is_reused_a_failed_one_goes_back_to_the_pool_and_close_completes() {
        let db = TestDatabase::create().await;
        let stash = Stash::new(&db.pool, 2);

        let mut first = HotConnection::acquire(&stash, &db.pool).await.unwrap();
        let first_pid = pid(&mut first).await;
        first.keep();
        assert_eq!(stash.len(), 1);
        let mut again = HotConnection::acquire(&stash, &db.pool).await.unwrap();
        assert_eq!(pid(&mut again).await, first_pid, "the stashed connection is used again");
        assert_eq!(stash.len(), 0);
        // A failed statement: the guard is dropped, the connection goes back to the pool.
        assert!(sqlx::query("SELECT * FROM no_such_table").execute(&mut *again).await.is_err());
        drop(again);
        assert_eq!(stash.len(), 0);

        // Beyond its capacity the stash gives connections back to the pool.
        let guards = [
            HotConnection::acquire(&stash, &db.pool).await.unwrap(),
            HotConnection::acquire(&stash, &db.pool).await.unwrap(),
            HotConnection::acquire(&stash, &db.pool).await.unwrap(),
        ];
        for guard in guards {
            guard.keep();
        }
        assert_eq!(stash.len(), 2);

        // The pool's close waits for every connection: the sweep hands the stashed ones back.
        tokio::time::timeout(Duration::from_secs(5), db.pool.close()).await.expect("close completes");
        assert_eq!(stash.len(), 0);
        db.drop_database().await;
    }
}

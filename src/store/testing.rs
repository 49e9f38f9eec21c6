//! Test databases: each test gets its own freshly migrated database on the local PostgreSQL
//! (`parley_test_<uuid>`), so tests run in parallel without seeing each other's rows.
//!
//! The admin connection is `postgres://postgres@127.0.0.1:5432/postgres`, or `PARLEY_TEST_PG_URL`
//! when set. End every test with [`TestDatabase::drop_database`]; a database dropped without it
//! (a failed assertion) is removed in the background if the process lives long enough, and
//! otherwise by a later [`TestDatabase::create`], which removes test databases older than an hour.

use std::{str::FromStr, time::Duration};

use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, PgConnection, PgPool, postgres::PgConnectOptions};
use uuid::Uuid;

use super::{StoreError, connect, migrate};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PREFIX: &str = "parley_test_";
/// Leftover test databases older than this are dropped by the next `create`.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// A migrated database of its own for one test.
pub struct TestDatabase {
    pub pool: PgPool,
    /// Its URL, for a service started by the test (`DATABASE_URL`).
    pub url: SecretString,
    name: String,
    admin: SecretString,
    dropped: bool,
}

impl std::fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase").field("name", &self.name).finish_non_exhaustive()
    }
}

fn admin_url() -> SecretString {
    SecretString::from(std::env::var("PARLEY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned()))
}

async fn admin_connection(admin: &SecretString) -> Result<PgConnection, StoreError> {
    let options = PgConnectOptions::from_str(admin.expose_secret())
        .map_err(|_| StoreError::Invalid("PARLEY_TEST_PG_URL is not a valid PostgreSQL URL".into()))?;
    Ok(PgConnection::connect_with(&options).await?)
}

impl TestDatabase {
    /// Creates and migrates a database; panics with what to do when PostgreSQL is not there.
    pub async fn create() -> TestDatabase {
        match Self::try_create().await {
            Ok(db) => db,
            Err(e) => panic!(
                "cannot create a test database: {e}. Start PostgreSQL with pgvector on 127.0.0.1:5432 \
                 or set PARLEY_TEST_PG_URL to an admin URL"
            ),
        }
    }

    pub async fn try_create() -> Result<TestDatabase, StoreError> {
        let admin = admin_url();
        let mut conn = admin_connection(&admin).await?;
        drop_stale(&mut conn).await;
        // v7: the name carries its creation time, which is how stale ones are recognised.
        let name = format!("{PREFIX}{}", Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        let _ = conn.close().await;

        let mut url = url::Url::parse(admin.expose_secret())
            .map_err(|_| StoreError::Invalid("PARLEY_TEST_PG_URL is not a valid URL".into()))?;
        url.set_path(&name);
        let url = SecretString::from(url.to_string());
        let pool = connect(&url).await?;
        let db = TestDatabase { pool, url, name, admin, dropped: false };
        migrate(&db.pool).await?;
        Ok(db)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database (connections still open elsewhere, such as a
    /// service the test started, are terminated).
    pub async fn drop_database(mut self) {
        self.dropped = true;
        self.pool.close().await;
        if let Err(e) = drop_named(&self.admin, &self.name).await {
            eprintln!("test database {} not dropped: {e}", self.name);
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Never block here (this may run on the async runtime, or while a test unwinds): a detached
        // thread tries; whatever it misses, a later `create` sweeps.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::Builder::new().name("drop-test-db".into()).spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                let _ = rt.block_on(drop_named(&admin, &name));
            }
        });
    }
}

async fn drop_named(admin: &SecretString, name: &str) -> Result<(), StoreError> {
    let mut conn = admin_connection(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// Drops test databases created (per their v7 name) more than [`STALE_AFTER`] ago. Best effort.
async fn drop_stale(conn: &mut PgConnection) {
    let Ok(names) = sqlx::query_scalar::<_, String>("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{PREFIX}%"))
        .fetch_all(&mut *conn)
        .await
    else {
        return;
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    for name in names {
        let Some(Ok(id)) = name.strip_prefix(PREFIX).map(Uuid::parse_str) else { continue };
        let Some((secs, _)) = id.get_timestamp().map(|t| t.to_unix()) else { continue };
        if id.get_version_num() == 7 && now.saturating_sub(Duration::from_secs(secs)) > STALE_AFTER {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut *conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_test_database_is_migrated_and_gone_after_drop() {
        let db = TestDatabase::create().await;
        let name = db.name().to_owned();
        let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'inbound_spool'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(tables, 1);
        let admin = admin_url();
        db.drop_database().await;

        let mut conn = admin_connection(&admin).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0);
    }
}

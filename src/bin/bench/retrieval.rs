//! The `retrieval` scenario: the knowledge search (`PgStore::search_knowledge`, what the
//! `rag-retrieve` stage calls) on a large knowledge base, for its latency and for its recall against
//! an exact search.
//!
//! A fresh database gets `--chunks` chunks (100,000 by default) over 42 tenants (one with half of
//! them, one with a tenth, forty sharing the rest), loaded by a binary `COPY` with the HNSW index dropped, then the index is built
//! again from its own definition (timed). Each query is a few words taken from one of the tenant's
//! chunks plus two other words, embedded like the chunks; it is searched for its top 5 through the
//! store, one query at a time, then exactly (index scans off: every chunk of the tenant compared).

use std::time::{Duration, Instant};

use engine::{embedding::hash_embedding, ids::TenantId, ports::RelationalStore};
use parley::store::{EMBEDDING_DIMENSIONS, PgStore, SeedTenant, testing::TestDatabase};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::{
    BenchError,
    latency::{Distribution, ms},
};

/// The chunks of one document.
const CHUNKS_PER_DOCUMENT: usize = 20;
/// How many results a search asks for (the `rag-retrieve` stage's default).
const TOP_K: usize = 5;
/// Searches run before the measured ones: statement caches, generic plans, buffers.
const WARM_UP: usize = 20;

/// How the chunks' embeddings are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vectors {
    /// The `hash` embedder (Parley's default) on generated texts: sparse, clustered by topic.
    Hash,
    /// Random unit vectors (dense, no structure: the hardest case for an approximate index); a query
    /// is one of the tenant's vectors with noise added.
    Random,
}

#[derive(Debug, Clone)]
pub struct RetrievalOptions {
    pub chunks: usize,
    pub queries: usize,
    pub vectors: Vectors,
    /// `plan_cache_mode` of the searching connections (PostgreSQL's default: `auto`).
    pub plan_cache_mode: Option<String>,
    /// `hnsw.ef_search` values, one measured pass each (none: pgvector's default, 40).
    pub ef_search: Vec<u32>,
    /// Leave the database in place (its name is printed) for a look with `psql`.
    pub keep_database: bool,
}

/// Tenants of one kind: `tenants` of them share `share` of the chunks and `query_share` of the
/// queries.
struct TenantGroup {
    name: &'static str,
    tenants: usize,
    share: f64,
    query_share: f64,
}

/// One large tenant, a medium one, and many small ones: the planner's estimates for a tenant it
/// does not know (a generic plan) come from how many tenants share the table.
const GROUPS: [TenantGroup; 3] = [
    TenantGroup { name: "Grande enseigne", tenants: 1, share: 0.50, query_share: 0.50 },
    TenantGroup { name: "Boutique", tenants: 1, share: 0.10, query_share: 0.25 },
    TenantGroup { name: "Artisans (40 tenants)", tenants: 40, share: 0.40, query_share: 0.25 },
];

struct Tenant {
    group: usize,
    id: Uuid,
    /// Index of its first chunk in the generated corpus, and how many.
    first: usize,
    count: usize,
}

struct Query {
    tenant: usize,
    group: usize,
    /// The chunk its words (or its vector) came from.
    source: usize,
    embedding: Vec<f32>,
}

/// One query's outcome.
struct Sample {
    group: usize,
    latency: Duration,
    exact_latency: Duration,
    /// Results within the exact top `TOP_K` (ties at the last place count), out of `expected`.
    hits: usize,
    expected: usize,
    /// Whether the chunk the query came from is among the results.
    source_found: bool,
}

pub async fn run(options: &RetrievalOptions) -> Result<(), BenchError> {
    let started = Instant::now();
    let db = TestDatabase::try_create().await.map_err(|e| {
        BenchError::Failed(format!(
            "cannot create the database: {e} (PostgreSQL with pgvector on 127.0.0.1:5432, or PARLEY_TEST_PG_URL)"
        ))
    })?;
    let outcome = measure(&db, options, started).await;
    if options.keep_database {
        println!("database kept: {} (drop it with `DROP DATABASE {}`)", db.name(), db.name());
        db.pool.close().await;
        // Its `Drop` would remove it.
        std::mem::forget(db);
    } else {
        db.drop_database().await;
    }
    outcome
}

async fn measure(db: &TestDatabase, options: &RetrievalOptions, started: Instant) -> Result<(), BenchError> {
    let pg = |e: sqlx::Error| BenchError::Failed(format!("PostgreSQL: {e}"));
    let mut rng = StdRng::seed_from_u64(20_251_128);
    let store = PgStore::new(db.pool.clone());

    // The corpus, its tenants and documents.
    let mut tenants = Vec::new();
    let mut first = 0;
    for (g, group) in GROUPS.iter().enumerate() {
        let count = ((options.chunks as f64 * group.share / group.tenants as f64).round() as usize).max(TOP_K);
        for _ in 0..group.tenants {
            let i = tenants.len();
            let seeded = store
                .seed_tenant(&SeedTenant {
                    name: format!("{} {i}", group.name),
                    phone_number_id: format!("RETRIEVAL-BENCH-{i}"),
                    plan: None,
                    monthly_messages: None,
                    provider: "meta".into(),
                })
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?;
            tenants.push(Tenant { group: g, id: seeded.tenant_id, first, count });
            first += count;
        }
    }
    let total = first;
    let t = Instant::now();
    let corpus = Corpus::generate(&mut rng, total, options.vectors);
    let generate = t.elapsed();

    let t = Instant::now();
    let mut conn = PgConnection::connect(expose(db)).await.map_err(pg)?;
    let index: String = sqlx::query_scalar("SELECT pg_get_indexdef('knowledge_chunks_embedding'::regclass)")
        .fetch_one(&mut conn)
        .await
        .map_err(pg)?;
    sqlx::query("DROP INDEX knowledge_chunks_embedding").execute(&mut conn).await.map_err(pg)?;
    load(&mut conn, &tenants, &corpus).await?;
    let load_time = t.elapsed();

    let t = Instant::now();
    // The graph of 100,000 vectors (~350 MB) is built in memory when it fits: PostgreSQL's default
    // 64 MB would make the build spill to disk and take many times longer.
    sqlx::query("SET maintenance_work_mem = '2GB'").execute(&mut conn).await.map_err(pg)?;
    sqlx::query(&index).execute(&mut conn).await.map_err(pg)?;
    let build_time = t.elapsed();
    // As autovacuum would have done: statistics, and the visibility map for index-only scans.
    sqlx::query("VACUUM ANALYZE knowledge_documents, knowledge_chunks").execute(&mut conn).await.map_err(pg)?;
    let (table_bytes, index_bytes): (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('knowledge_chunks') - pg_indexes_size('knowledge_chunks'),
                pg_relation_size('knowledge_chunks_embedding')",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(pg)?;
    let build_workers: String =
        sqlx::query_scalar("SHOW max_parallel_maintenance_workers").fetch_one(&mut conn).await.map_err(pg)?;

    // The queries, spread over the tenants.
    let mut queries = Vec::new();
    for (g, group) in GROUPS.iter().enumerate() {
        let members: Vec<usize> = (0..tenants.len()).filter(|&i| tenants[i].group == g).collect();
        let n = ((options.queries as f64 * group.query_share).round() as usize).max(1);
        for _ in 0..n {
            let i = *members.choose(&mut rng).unwrap_or(&0);
            let tenant = &tenants[i];
            let source = tenant.first + rng.random_range(0..tenant.count);
            queries.push(Query { tenant: i, group: g, source, embedding: corpus.query_near(&mut rng, source) });
        }
    }

    // The exact top 5 of each query: every chunk of the tenant compared.
    sqlx::query("SET enable_indexscan = off").execute(&mut conn).await.map_err(pg)?;
    let mut exact = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        let scores: Vec<f64> = sqlx::query_scalar(
            "SELECT 1 - (c.embedding <=> $2::text::vector)
             FROM knowledge_chunks c JOIN knowledge_documents d ON d.id = c.document_id
             WHERE c.tenant_id = $1 AND d.status = 'indexed'
             ORDER BY c.embedding <=> $2::text::vector
             LIMIT $3",
        )
        .bind(tenants[q.tenant].id)
        .bind(literal(&q.embedding))
        .bind(TOP_K as i64)
        // Planned for its parameters each time: a generic plan would convert the text per row.
        .persistent(false)
        .fetch_all(&mut conn)
        .await
        .map_err(pg)?;
        exact.push((t.elapsed(), scores));
    }
    sqlx::query("RESET enable_indexscan").execute(&mut conn).await.map_err(pg)?;

    println!(
        "\n### Knowledge retrieval: {total} chunks of {EMBEDDING_DIMENSIONS} dimensions ({}), top {TOP_K}\n",
        match options.vectors {
            Vectors::Hash => "hash embeddings of generated texts",
            Vectors::Random => "random unit vectors",
        }
    );
    println!(
        "- generated in {:.1} s; loaded (binary COPY, no HNSW index) in {:.1} s; table {} MB",
        generate.as_secs_f64(),
        load_time.as_secs_f64(),
        table_bytes / 1_000_000
    );
    println!(
        "- HNSW index built after loading in {:.1} s (`maintenance_work_mem` 2GB, `max_parallel_maintenance_workers` \
         {build_workers}); {} MB",
        build_time.as_secs_f64(),
        index_bytes / 1_000_000
    );
    let efs: Vec<Option<u32>> =
        if options.ef_search.is_empty() { vec![None] } else { options.ef_search.iter().copied().map(Some).collect() };
    for ef in efs {
        let mut settings = Vec::new();
        if let Some(mode) = &options.plan_cache_mode {
            settings.push(format!("plan_cache_mode = '{}'", mode.replace('\'', "")));
        }
        if let Some(ef) = ef {
            settings.push(format!("hnsw.ef_search = {ef}"));
        }
        sqlx::query(&format!("ALTER DATABASE {} RESET ALL", db.name())).execute(&mut conn).await.map_err(pg)?;
        for setting in &settings {
            sqlx::query(&format!("ALTER DATABASE {} SET {setting}", db.name())).execute(&mut conn).await.map_err(pg)?;
        }
        let pass = search_pass(db, &mut conn, &tenants, &queries).await?;
        let samples: Vec<Sample> = queries
            .iter()
            .zip(&pass.found)
            .zip(&exact)
            .map(|((q, (latency, results)), (exact_latency, scores))| {
                let last = scores.last().copied().unwrap_or(f64::INFINITY);
                // Scores travel as f32 from the store: a tie at the last place is within its precision.
                let hits = results.iter().filter(|r| f64::from(r.score) >= last - 1e-5).count().min(scores.len());
                Sample {
                    group: q.group,
                    latency: *latency,
                    exact_latency: *exact_latency,
                    hits,
                    expected: scores.len(),
                    source_found: results.iter().any(|r| r.text == corpus.texts[q.source]),
                }
            })
            .collect();
        println!(
            "\nSearching connections: {}.\n",
            if settings.is_empty() { "PostgreSQL's and pgvector's defaults".to_owned() } else { settings.join(", ") }
        );
        print_table(&tenants, &samples, total);
        println!();
        println!(
            "- {} searches measured one at a time after {WARM_UP} warm-up ones, {:.0} per second; PostgreSQL CPU {:.2} \
             ms per search ({} backend(s))",
            queries.len(),
            queries.len() as f64 / pass.elapsed.as_secs_f64(),
            pass.pg_cpu_ticks as f64 * 1000.0 / clock_ticks() as f64 / queries.len() as f64,
            pass.backends
        );
        println!(
            "- index scans (warm-up included: {} searches): HNSW {}, tenant btree {} (the exact branch and the \
             count of a tenant's chunks)",
            queries.len() + WARM_UP,
            pass.hnsw_scans,
            pass.btree_scans
        );
    }
    let _ = conn.close().await;
    println!("- whole run {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// One measured pass of the store's search.
struct Pass {
    found: Vec<(Duration, Vec<engine::message::KnowledgeChunk>)>,
    elapsed: Duration,
    pg_cpu_ticks: u64,
    backends: usize,
    hnsw_scans: i64,
    btree_scans: i64,
}

/// The store's search, as the pipeline runs it: its own pool (Parley's connection setup, the
/// database's settings), one query at a time.
async fn search_pass(
    db: &TestDatabase,
    conn: &mut PgConnection,
    tenants: &[Tenant],
    queries: &[Query],
) -> Result<Pass, BenchError> {
    let stats_before = index_scans(conn).await?;
    let pool = parley::store::connect(&db.url).await.map_err(|e| BenchError::Failed(e.to_string()))?;
    let searcher = PgStore::new(pool.clone());
    let search = |q: &Query| {
        let tenant = TenantId::new(tenants[q.tenant].id.to_string());
        let searcher = &searcher;
        let embedding = q.embedding.clone();
        async move {
            // `min_score` −1 keeps every result: the threshold is not what is measured.
            searcher
                .search_knowledge(&tenant, &embedding, TOP_K, -1.0)
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))
        }
    };
    for q in queries.iter().cycle().take(WARM_UP) {
        search(q).await?;
    }
    let backends = backend_pids(conn, db.name()).await?;
    let cpu_before = cpu_ticks(&backends);
    let mut found = Vec::with_capacity(queries.len());
    let started = Instant::now();
    for q in queries {
        let t = Instant::now();
        let results = search(q).await?;
        found.push((t.elapsed(), results));
    }
    let elapsed = started.elapsed();
    let pg_cpu_ticks = cpu_ticks(&backends).saturating_sub(cpu_before);
    // A closing backend reports its statistics: the index scans are then all counted.
    pool.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats_after = index_scans(conn).await?;
    Ok(Pass {
        found,
        elapsed,
        pg_cpu_ticks,
        backends: backends.len(),
        hnsw_scans: stats_after.0 - stats_before.0,
        btree_scans: stats_after.1 - stats_before.1,
    })
}

fn print_table(tenants: &[Tenant], samples: &[Sample], total: usize) {
    println!(
        "| tenant | chunks | queries | p50 | p99 | max | recall@{TOP_K} | queries with full recall | source chunk found | \
         exact search p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(String, Vec<&Sample>, usize)> = GROUPS
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let chunks = tenants.iter().filter(|t| t.group == g).map(|t| t.count).sum();
            (group.name.to_owned(), samples.iter().filter(|s| s.group == g).collect(), chunks)
        })
        .collect();
    rows.push(("all".into(), samples.iter().collect(), total));
    for (name, group, chunks) in &rows {
        let latency = Distribution::new(group.iter().map(|s| s.latency).collect());
        let exact = Distribution::new(group.iter().map(|s| s.exact_latency).collect());
        let hits: usize = group.iter().map(|s| s.hits).sum();
        let expected: usize = group.iter().map(|s| s.expected).sum();
        let full = group.iter().filter(|s| s.hits == s.expected).count();
        let source = group.iter().filter(|s| s.source_found).count();
        println!(
            "| {name} | {chunks} | {} | {} | {} | {} | {:.3} | {full}/{} | {source}/{} | {} |",
            group.len(),
            ms(latency.p50()),
            ms(latency.p99()),
            ms(latency.max()),
            hits as f64 / expected.max(1) as f64,
            group.len(),
            group.len(),
            ms(exact.p50()),
        );
    }
}

fn expose(db: &TestDatabase) -> &str {
    secrecy::ExposeSecret::expose_secret(&db.url)
}

/// Scans of the HNSW index and of the tenant index since the database was created.
async fn index_scans(conn: &mut PgConnection) -> Result<(i64, i64), BenchError> {
    sqlx::query_as(
        "SELECT coalesce(sum(idx_scan) FILTER (WHERE indexrelname = 'knowledge_chunks_embedding'), 0)::bigint,
                coalesce(sum(idx_scan) FILTER (WHERE indexrelname = 'knowledge_chunks_tenant_id'), 0)::bigint
         FROM pg_stat_user_indexes WHERE relname = 'knowledge_chunks'",
    )
    .fetch_one(conn)
    .await
    .map_err(|e| BenchError::Failed(format!("PostgreSQL: {e}")))
}

/// The backends of the run's database other than `conn`'s own: the store's pool.
async fn backend_pids(conn: &mut PgConnection, database: &str) -> Result<Vec<u32>, BenchError> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(database)
            .fetch_all(conn)
            .await
            .map_err(|e| BenchError::Failed(format!("PostgreSQL: {e}")))?;
    Ok(pids.into_iter().filter_map(|p| u32::try_from(p).ok()).collect())
}

/// User + system CPU of these processes, in clock ticks (0 for a process not on this machine).
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces), from the state on: utime is 14th.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn clock_ticks() -> u64 {
    // Linux's USER_HZ, the unit of /proc/<pid>/stat, is 100 on every architecture it runs on.
    100
}

fn literal(v: &[f32]) -> String {
    format!("[{}]", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
}

/// The generated chunks: their texts and embeddings, tenant after tenant.
struct Corpus {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
    kind: Vectors,
    words: Vec<String>,
}

impl Corpus {
    fn generate(rng: &mut StdRng, count: usize, kind: Vectors) -> Self {
        let words = vocabulary(rng, 6_000);
        // Each document has a topic: a few hundred words its chunks favour.
        let topics: Vec<Vec<usize>> = (0..400).map(|_| (0..150).map(|_| zipf(rng, words.len())).collect()).collect();
        let mut texts = Vec::with_capacity(count);
        let mut vectors = Vec::with_capacity(count);
        for i in 0..count {
            let topic = &topics[(i / CHUNKS_PER_DOCUMENT) % topics.len()];
            let len = rng.random_range(30..70);
            let mut text = String::with_capacity(len * 8);
            for j in 0..len {
                if j > 0 {
                    text.push(' ');
                }
                let w = if rng.random_bool(0.6) { *topic.choose(rng).unwrap_or(&0) } else { zipf(rng, words.len()) };
                text.push_str(&words[w]);
            }
            // Unique, as chunks of real documents are.
            text.push_str(&format!(" (chunk {i})"));
            let vector = match kind {
                Vectors::Hash => hash_embedding(&text, EMBEDDING_DIMENSIONS),
                Vectors::Random => unit(rng, EMBEDDING_DIMENSIONS),
            };
            texts.push(text);
            vectors.push(vector);
        }
        Self { texts, vectors, kind, words }
    }

    /// A query about chunk `source`: some of its words and two others (hash), or its vector with
    /// noise (random).
    fn query_near(&self, rng: &mut StdRng, source: usize) -> Vec<f32> {
        match self.kind {
            Vectors::Hash => {
                let words: Vec<&str> = self.texts[source].split(' ').collect();
                let len = rng.random_range(5..10).min(words.len());
                let start = rng.random_range(0..=words.len() - len);
                let mut query: Vec<&str> = words[start..start + len].to_vec();
                query.push(&self.words[zipf(rng, self.words.len())]);
                query.push(&self.words[zipf(rng, self.words.len())]);
                hash_embedding(&query.join(" "), EMBEDDING_DIMENSIONS)
            }
            Vectors::Random => {
                let noise = unit(rng, EMBEDDING_DIMENSIONS);
                let mut v: Vec<f32> = self.vectors[source].iter().zip(&noise).map(|(a, b)| a + 0.8 * b).collect();
                normalise(&mut v);
                v
            }
        }
    }
}

/// Pronounceable made-up words, distinct.
fn vocabulary(rng: &mut StdRng, size: usize) -> Vec<String> {
    const SYLLABLES: [&str; 24] = [
        "ba", "ce", "di", "fo", "gu", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "zo", "char", "mon", "pre",
        "tri", "lan", "ver", "bou", "gne", "quo", "ste",
    ];
    let mut seen = std::collections::HashSet::new();
    let mut words = Vec::with_capacity(size);
    while words.len() < size {
        let n = rng.random_range(2..5);
        let word: String = (0..n).map(|_| *SYLLABLES.choose(rng).unwrap_or(&"ba")).collect();
        if seen.insert(word.clone()) {
            words.push(word);
        }
    }
    words
}

/// An index in `0..n`, small ones far more often (roughly Zipf's law, as words in a language).
fn zipf(rng: &mut StdRng, n: usize) -> usize {
    let u: f64 = rng.random_range(0.0..1.0);
    (((n as f64 + 1.0).powf(u) - 1.0) as usize).min(n - 1)
}

fn unit(rng: &mut StdRng, dims: usize) -> Vec<f32> {
    // Sums of uniforms are near enough to normal for a direction with no preference.
    let mut v: Vec<f32> = (0..dims).map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum()).collect();
    normalise(&mut v);
    v
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The documents (all `indexed`), then every chunk by a binary `COPY`.
async fn load(conn: &mut PgConnection, tenants: &[Tenant], corpus: &Corpus) -> Result<(), BenchError> {
    let pg = |e: sqlx::Error| BenchError::Failed(format!("PostgreSQL: {e}"));
    let mut documents = Vec::new();
    for tenant in tenants {
        let end = tenant.first + tenant.count;
        for (d, start) in (tenant.first..end).step_by(CHUNKS_PER_DOCUMENT).enumerate() {
            documents.push((Uuid::new_v4(), tenant.id, d, start..(start + CHUNKS_PER_DOCUMENT).min(end)));
        }
    }
    for batch in documents.chunks(5_000) {
        sqlx::query(
            "INSERT INTO knowledge_documents (id, tenant_id, title, source, content_hash, status, bytes)
             SELECT id, tenant, 'Document ' || n, 'doc-' || n || '.md', md5(id::text), 'indexed', 40000
             FROM unnest($1::uuid[], $2::uuid[], $3::int[]) AS t (id, tenant, n)",
        )
        .bind(batch.iter().map(|d| d.0).collect::<Vec<_>>())
        .bind(batch.iter().map(|d| d.1).collect::<Vec<_>>())
        .bind(batch.iter().map(|d| d.2 as i32).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .map_err(pg)?;
    }

    let mut copy = conn
        .copy_in_raw(
            "COPY knowledge_chunks (document_id, tenant_id, ordinal, text, embedding) FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(pg)?;
    // PGCOPY's header: signature, flags, header extension length.
    let mut buf: Vec<u8> = Vec::with_capacity(8 << 20);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    for (document, tenant, _, chunks) in &documents {
        for (ordinal, i) in chunks.clone().enumerate() {
            buf.extend_from_slice(&5i16.to_be_bytes());
            field(&mut buf, document.as_bytes());
            field(&mut buf, tenant.as_bytes());
            field(&mut buf, &(ordinal as i32).to_be_bytes());
            field(&mut buf, corpus.texts[i].as_bytes());
            // pgvector's binary form: dimensions and a reserved zero (int16 each), then float4s.
            let vector = &corpus.vectors[i];
            let mut bytes = Vec::with_capacity(4 + 4 * vector.len());
            bytes.extend_from_slice(&(vector.len() as i16).to_be_bytes());
            bytes.extend_from_slice(&0i16.to_be_bytes());
            for x in vector {
                bytes.extend_from_slice(&x.to_be_bytes());
            }
            field(&mut buf, &bytes);
            if buf.len() > (8 << 20) - 64 * 1024 {
                copy.send(std::mem::take(&mut buf)).await.map_err(pg)?;
                buf.reserve(8 << 20);
            }
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(buf).await.map_err(pg)?;
    copy.finish().await.map_err(pg)?;
    Ok(())
}

/// A binary COPY field: its length, then its bytes.
fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    buf.extend_from_slice(bytes);
}

//! The client against real Redis and PostgreSQL servers (cacheclear-harness: private instances on
//! free loopback ports, killed on drop).
//!
//! Numbered tests are the required ones; the rest cover the remaining behaviour.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cacheclear_client::{
    Client, Config, Error, HookPoint, LocalTierConfig, Lsn, ReadPolicy, RedisErrorPolicy,
    ReplicaVersionError, WaitTimeoutPolicy, jittered_ttl_ms, replica_read_version,
};
use cacheclear_harness::{PgInstance, RedisInstance};
use cacheclear_protocol::{KeyLayout, scripts};
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

// ----- helpers -----

/// A one-shot pause at one [`HookPoint`]: the first time the client reaches it, `reached` is
/// notified and the client waits for `resume`. Later passes go straight through.
#[derive(Clone)]
struct Gate {
    point: HookPoint,
    armed: Arc<AtomicBool>,
    reached: Arc<Notify>,
    resume: Arc<Notify>,
}

impl Gate {
    fn new(point: HookPoint) -> Gate {
        Gate {
            point,
            armed: Arc::new(AtomicBool::new(true)),
            reached: Arc::new(Notify::new()),
            resume: Arc::new(Notify::new()),
        }
    }

    fn hook(&self) -> cacheclear_client::Hook {
        let gate = self.clone();
        Arc::new(move |point, _key| {
            let gate = gate.clone();
            Box::pin(async move {
                if point == gate.point && gate.armed.swap(false, Ordering::SeqCst) {
                    gate.reached.notify_one();
                    gate.resume.notified().await;
                }
            })
        })
    }

    async fn wait_reached(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.reached.notified())
            .await
            .expect("the client never reached the hook point");
    }

    fn resume(&self) {
        self.resume.notify_one();
    }
}

async fn redis_conn(redis: &RedisInstance) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("harness url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis")
}

async fn pg_connect(pg: &PgInstance) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.conn_string(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test postgres");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn current_lsn(db: &tokio_postgres::Client) -> Lsn {
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn");
    row.get::<_, String>(0).parse().expect("pg_lsn text")
}

/// Applies the protocol's INVALIDATE script for one key, as the pipeline does.
async fn invalidate(conn: &mut MultiplexedConnection, key: &str, lsn: Lsn) {
    let k = KeyLayout::new(key).expect("key");
    let script = scripts::invalidate();
    let mut call = script.key(k.value());
    call.key(k.lease()).key(k.fence());
    // INVALIDATE_LUA's ARGV: [1] the fence TTL (ms), [1 + j] the j-th key's commit LSN.
    call.arg(60_000).arg(lsn.to_fixed_hex());
    let n: i64 = call.invoke_async(conn).await.expect("INVALIDATE");
    assert_eq!(n, 1);
}

async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .expect("EXISTS");
    n == 1
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(conn)
        .await
        .expect("PTTL")
}

async fn price(db: &tokio_postgres::Client, id: i32) -> Result<i32, tokio_postgres::Error> {
    let row = db
        .query_one("SELECT price FROM product WHERE id = $1", &[&id])
        .await?;
    row.try_get(0)
}

fn start_pg_with_product(price: i32) -> PgInstance {
    let pg = PgInstance::start().expect("start postgres");
    pg.psql(&format!(
        "CREATE TABLE product (id int PRIMARY KEY, price int NOT NULL); INSERT INTO product VALUES (1, {price});"
    ))
    .expect("create table");
    pg
}

fn quick(config: Config) -> Config {
    config.with_backoff_initial_ms(2).with_backoff_max_ms(20)
}

// ----- 1. read-old / invalidate / set-old -----

/// Required test 1: the loader reads the old price, pauses; the price is updated and the
/// pipeline's INVALIDATE runs with the commit's LSN; the loader resumes: its fill is refused
/// (the invalidation deleted its lease), and the next read loads the new price.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_read_old_invalidate_set_old_never_stores_the_old_value() -> TestResult {
    let pg = start_pg_with_product(100);
    let redis = RedisInstance::start()?;
    let db = Arc::new(pg_connect(&pg).await);
    let mut r = redis_conn(&redis).await;
    let gate = Gate::new(HookPoint::BeforeFill);
    let client = Client::connect(&redis.url(), Config::default().with_hook(gate.hook())).await?;

    let task = {
        let (client, db) = (client.clone(), db.clone());
        tokio::spawn(async move {
            client
                .get_or_load("product:1", || async {
                    Ok::<_, tokio_postgres::Error>(cacheclear_client::Loaded::new(
                        price(&db, 1).await?,
                    ))
                })
                .await
        })
    };
    gate.wait_reached().await; // the loader has returned 100; the fill has not run

    db.execute("UPDATE product SET price = 50 WHERE id = 1", &[])
        .await?;
    let commit_lsn = current_lsn(&db).await; // ≥ the commit record's end
    invalidate(&mut r, "product:1", commit_lsn).await;

    gate.resume();
    assert_eq!(
        task.await??,
        100,
        "the racing read returns what it read, uncached"
    );
    let stats = client.stats();
    assert_eq!(stats.fills_refused_lease_lost, 1);
    assert_eq!(stats.fills, 0);
    assert!(
        !exists(&mut r, "{product:1}").await,
        "the old value was stored"
    );
    assert!(
        !exists(&mut r, "{product:1}:lease").await,
        "a lease was left behind"
    );

    let now: i32 = client
        .get_or_load("product:1", || async {
            Ok::<_, tokio_postgres::Error>(cacheclear_client::Loaded::new(price(&db, 1).await?))
        })
        .await?;
    assert_eq!(now, 50);
    assert_eq!(client.stats().fills, 1);
    // And it is served from Redis now.
    let again: i32 = client
        .get_or_load("product:1", || async {
            Err::<cacheclear_client::Loaded<i32>, _>("must not load")
        })
        .await?;
    assert_eq!(again, 50);
    Ok(())
}

/// Single-flight never hands a read an answer older than its own start: the leader's loader
/// read the old price and pauses before its fill; the invalidation is applied; only then does a
/// second read of the key start in the same process, and it joins the leader's flight. The
/// leader's fill is refused, so its value was observed before the second read joined: the
/// second read must read again and get the new price, not the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_joining_after_an_invalidation_never_gets_the_older_shared_value() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let gate = Gate::new(HookPoint::BeforeFill);
    let client = Client::connect(
        &redis.url(),
        quick(Config::default()).with_hook(gate.hook()),
    )
    .await?;
    let db_price = Arc::new(AtomicUsize::new(100));
    let read = |client: Client, db_price: Arc<AtomicUsize>| async move {
        client
            .get_or_load("product:1", move || async move {
                Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(
                    db_price.load(Ordering::SeqCst),
                ))
            })
            .await
    };
    let leader = tokio::spawn(read(client.clone(), db_price.clone()));
    gate.wait_reached().await; // the leader's loader returned 100; its fill has not run

    db_price.store(50, Ordering::SeqCst);
    invalidate(&mut r, "product:1", Lsn(0x200)).await;
    let follower = tokio::spawn(read(client.clone(), db_price.clone()));
    // The follower has missed and joined the leader's flight.
    tokio::time::timeout(Duration::from_secs(10), async {
        while client.stats().coalesced == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await?;
    gate.resume();
    assert_eq!(
        leader.await??,
        100,
        "the leader returns what it read, uncached"
    );
    assert_eq!(
        follower.await??,
        50,
        "a read that started after the invalidation got the value read before it"
    );
    let stats = client.stats();
    assert_eq!(stats.fills_refused_lease_lost, 1);
    assert_eq!(stats.coalesced_retries, 1);
    assert_eq!(stats.loads, 2);
    Ok(())
}

/// The fence half of the protocol: a loader reading a lagging replica (its version is older than
/// an invalidation already applied) cannot fill, even though it holds a valid lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1b_replica_read_older_than_the_fence_is_refused() -> TestResult {
    let pg = start_pg_with_product(100);
    let redis = RedisInstance::start()?;
    let db = pg_connect(&pg).await;
    let mut r = redis_conn(&redis).await;
    let client = Client::connect(&redis.url(), Config::default()).await?;

    let before = current_lsn(&db).await; // what a replica that has not replayed the UPDATE reports
    db.execute("UPDATE product SET price = 75 WHERE id = 1", &[])
        .await?;
    let commit_lsn = current_lsn(&db).await;
    assert!(commit_lsn > before);
    invalidate(&mut r, "product:1", commit_lsn).await;

    // The lagging replica still shows 100 at version `before`.
    let v: i32 = client
        .get_or_load("product:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::at(100, before))
        })
        .await?;
    assert_eq!(v, 100);
    assert_eq!(client.stats().fills_refused_fenced, 1);
    assert!(!exists(&mut r, "{product:1}").await);
    assert!(!exists(&mut r, "{product:1}:lease").await);

    // A replica that has replayed the commit (version ≥ fence) fills.
    let fresh = price(&db, 1).await?;
    let v: i32 = client
        .get_or_load("product:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::at(fresh, commit_lsn))
        })
        .await?;
    assert_eq!(v, 75);
    assert_eq!(client.stats().fills, 1);
    assert!(exists(&mut r, "{product:1}").await);

    // On the primary, replica_read_version says so clearly.
    match replica_read_version(&db).await {
        Err(ReplicaVersionError::NotAReplica) => {}
        other => panic!("expected NotAReplica, got {other:?}"),
    }
    Ok(())
}

// ----- 2. stampede -----

/// Required test 2: 5 client instances (separate connections) × 100 concurrent tasks miss the
/// same key; exactly one loader runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_five_hundred_concurrent_misses_run_one_loader() -> TestResult {
    let pg = start_pg_with_product(100);
    let redis = RedisInstance::start()?;
    let db = Arc::new(pg_connect(&pg).await);
    let calls = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(Client::connect(&redis.url(), Config::default()).await?);
    }
    let start = Arc::new(tokio::sync::Barrier::new(500));
    let mut tasks = Vec::new();
    for client in &clients {
        for _ in 0..100 {
            let (client, db, calls, start) =
                (client.clone(), db.clone(), calls.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                client
                    .get_or_load("product:1", || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, tokio_postgres::Error>(cacheclear_client::Loaded::new(
                            price(&db, 1).await?,
                        ))
                    })
                    .await
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await??, 100);
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "exactly one loader across 5 clients × 100 tasks"
    );
    let loads: u64 = clients.iter().map(|c| c.stats().loads).sum();
    let fills: u64 = clients.iter().map(|c| c.stats().fills).sum();
    let waits: u64 = clients.iter().map(|c| c.stats().lease_waits).sum();
    let coalesced: u64 = clients.iter().map(|c| c.stats().coalesced).sum();
    assert_eq!((loads, fills), (1, 1));
    assert!(waits >= 1, "the other clients waited on the lease");
    assert!(coalesced >= 1, "single-flight coalesced in-process misses");
    eprintln!("lease_waits = {waits}, coalesced = {coalesced}");
    Ok(())
}

// ----- 3. expired leases -----

/// Required test 3: a holder whose lease expired can neither fill nor release the new holder's
/// lease (after a successful load, and after a failed one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3_expired_holder_cannot_fill_or_release_the_new_holders_lease() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;

    for failing in [false, true] {
        let key = if failing { "k:failed" } else { "k:filled" };
        let lease_key = format!("{{{key}}}:lease");
        // Holder A: a 150 ms lease, paused after its load (or its failure).
        let gate_a = Gate::new(if failing {
            HookPoint::BeforeRelease
        } else {
            HookPoint::BeforeFill
        });
        let a = Client::connect(
            &redis.url(),
            Config::default()
                .with_lease_ms(150)
                .with_hook(gate_a.hook()),
        )
        .await?;
        // Holder B: takes the lease once A's expired, and pauses before its fill.
        let gate_b = Gate::new(HookPoint::BeforeFill);
        let b = Client::connect(
            &redis.url(),
            Config::default()
                .with_lease_ms(10_000)
                .with_hook(gate_b.hook()),
        )
        .await?;

        let task_a = tokio::spawn({
            let a = a.clone();
            async move {
                a.get_or_load(key, || async move {
                    if failing {
                        Err("database unavailable")
                    } else {
                        Ok(cacheclear_client::Loaded::new("from A".to_string()))
                    }
                })
                .await
            }
        });
        gate_a.wait_reached().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !exists(&mut r, &lease_key).await,
            "A's lease should have expired"
        );

        let task_b = tokio::spawn({
            let b = b.clone();
            async move {
                b.get_or_load(key, || async {
                    Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(
                        "from B".to_string(),
                    ))
                })
                .await
            }
        });
        gate_b.wait_reached().await;
        let b_token: String = redis::cmd("GET")
            .arg(&lease_key)
            .query_async(&mut r)
            .await?;

        gate_a.resume();
        let result_a = task_a.await?;
        if failing {
            assert!(
                matches!(result_a, Err(Error::Loader { .. })),
                "{result_a:?}"
            );
        } else {
            assert_eq!(result_a?, "from A");
            assert_eq!(a.stats().fills_refused_lease_lost, 1);
        }
        assert_eq!(a.stats().fills, 0);
        let still: Option<String> = redis::cmd("GET")
            .arg(&lease_key)
            .query_async(&mut r)
            .await?;
        assert_eq!(
            still.as_deref(),
            Some(b_token.as_str()),
            "A touched B's lease"
        );
        assert!(
            !exists(&mut r, &format!("{{{key}}}")).await,
            "A filled without a lease"
        );

        gate_b.resume();
        assert_eq!(task_b.await??, "from B");
        assert_eq!(b.stats().fills, 1);
        let stored: String = redis::cmd("GET")
            .arg(format!("{{{key}}}"))
            .query_async(&mut r)
            .await?;
        assert!(stored.contains("\"from B\""), "{stored}");
        assert!(!exists(&mut r, &lease_key).await);
    }
    Ok(())
}

// ----- 6. failures -----

/// Required test 6a: a failed loader returns its error and leaves neither a value nor a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_failed_loader_leaves_no_value_and_no_lease() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let client = Client::connect(&redis.url(), Config::default()).await?;
    let err = client
        .get_or_load("product:9", || async {
            Err::<cacheclear_client::Loaded<i32>, _>(std::io::Error::other("db down"))
        })
        .await
        .unwrap_err();
    match &err {
        Error::Loader { key, source } => {
            assert_eq!(key, "product:9");
            assert_eq!(source.to_string(), "db down");
        }
        other => panic!("expected a loader error, got {other:?}"),
    }
    assert!(err.to_string().contains("product:9"), "{err}");
    assert!(!exists(&mut r, "{product:9}").await);
    assert!(!exists(&mut r, "{product:9}:lease").await);
    assert_eq!(client.stats().loader_errors, 1);
    // The next read loads and fills normally.
    let v: i32 = client
        .get_or_load("product:9", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(9))
        })
        .await?;
    assert_eq!(v, 9);
    assert_eq!(client.stats().fills, 1);
    Ok(())
}

/// Required test 6b: Redis down → the loader answers and `redis_errors` counts; with the error
/// policy the read fails instead. After Redis comes back, reads cache again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6_redis_down_falls_back_or_errors_per_policy() -> TestResult {
    let mut redis = RedisInstance::start()?;
    let fallback = Client::connect(&redis.url(), quick(Config::default())).await?;
    let strict = Client::connect(
        &redis.url(),
        Config::default().with_on_redis_error(RedisErrorPolicy::Error),
    )
    .await?;
    redis.stop()?;

    let started = Instant::now();
    let v: i32 = fallback
        .get_or_load("product:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await?;
    assert_eq!(v, 1);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fallback took {:?}",
        started.elapsed()
    );
    let s = fallback.stats();
    assert!(s.redis_errors >= 1, "{s:?}");
    assert_eq!(s.fallbacks, 1);
    assert_eq!(s.fills, 0);

    let calls = AtomicUsize::new(0);
    let err = strict
        .get_or_load("product:1", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Redis { .. }), "{err:?}");
    assert!(err.to_string().contains("product:1"), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the error policy must not read the database"
    );
    assert!(strict.stats().redis_errors >= 1);

    // Redis back: the connection manager reconnects and reads cache again.
    redis.start_again()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: i32 = fallback
            .get_or_load("product:1", || async {
                Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(2))
            })
            .await?;
        assert_eq!(v, 2);
        if fallback.stats().fills == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never reconnected: {:?}",
            fallback.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Redis full (maxmemory reached, `noeviction`) means "don't cache": the loaded value is
/// returned, nothing is stored, no lease is left, and it is not counted as a Redis error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_means_do_not_cache() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let admin = r.clone();
    let set_maxmemory = move |bytes: &'static str| {
        let mut r = admin.clone();
        async move {
            let () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("noeviction")
                .query_async(&mut r)
                .await?;
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(bytes)
                .query_async::<()>(&mut r)
                .await
        }
    };

    // Full before the read: the lease `SET` gets OOM.
    let client = Client::connect(
        &redis.url(),
        Config::default().with_on_redis_error(RedisErrorPolicy::Error),
    )
    .await?;
    set_maxmemory("1").await?;
    let v: String = client
        .get_or_load("big:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new("x".repeat(10_000)))
        })
        .await?;
    assert_eq!(v.len(), 10_000);
    let s = client.stats();
    assert_eq!(
        (s.fills_skipped_oom, s.fills, s.redis_errors, s.fallbacks),
        (1, 0, 0, 0),
        "{s:?}"
    );
    assert!(!exists(&mut r, "{big:1}").await);
    assert!(!exists(&mut r, "{big:1}:lease").await);
    set_maxmemory("0").await?;

    // Full between the lease and the fill. Redis checks OOM only before a script's first write,
    // and FILL_LUA deletes the lease (a write) before it sets the value, so Redis 7 lets this
    // fill through (memory overshoots until the next command). Either way: the value is
    // returned and no lease is left.
    let gate = Gate::new(HookPoint::BeforeFill);
    let client = Client::connect(&redis.url(), Config::default().with_hook(gate.hook())).await?;
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get_or_load("big:2", || async {
                    Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(
                        "y".repeat(10_000),
                    ))
                })
                .await
        }
    });
    gate.wait_reached().await;
    set_maxmemory("1").await?;
    gate.resume();
    let v = task.await??;
    set_maxmemory("0").await?;
    assert_eq!(v.len(), 10_000);
    let s = client.stats();
    eprintln!(
        "fill under OOM: fills = {}, fills_skipped_oom = {}",
        s.fills, s.fills_skipped_oom
    );
    assert_eq!(s.fills + s.fills_skipped_oom, 1, "{s:?}");
    assert_eq!(s.redis_errors, 0, "{s:?}");
    assert_eq!(exists(&mut r, "{big:2}").await, s.fills == 1);
    assert!(!exists(&mut r, "{big:2}:lease").await);
    Ok(())
}

// ----- 7. TTLs -----

/// Required test 7: every key the client writes has a TTL (value and lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t7_every_written_key_has_a_ttl() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let gate = Gate::new(HookPoint::BeforeFill);
    let config = Config::default()
        .with_lease_ms(5_000)
        .with_ttl_base_ms(60_000)
        .with_ttl_jitter(0.05)
        .with_hook(gate.hook());
    let client = Client::connect(&redis.url(), config).await?;
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get_or_load("product:7", || async {
                    Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(7))
                })
                .await
        }
    });
    gate.wait_reached().await;
    let lease_ttl = pttl(&mut r, "{product:7}:lease").await;
    assert!(
        lease_ttl > 0 && lease_ttl <= 5_000,
        "lease PTTL {lease_ttl}"
    );
    gate.resume();
    assert_eq!(task.await??, 7);
    let value_ttl = pttl(&mut r, "{product:7}").await;
    assert!(value_ttl > 0, "value PTTL {value_ttl}");
    assert!(
        (57_000 - 1_000..=63_000).contains(&value_ttl),
        "value PTTL {value_ttl} outside 60 s ± 5%"
    );
    // The client never writes fences (the pipeline's), and left nothing else.
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut r).await?;
    keys.sort();
    assert_eq!(keys, vec!["{product:7}".to_string()]);
    for key in keys {
        assert!(pttl(&mut r, &key).await > 0, "{key} has no TTL");
    }
    Ok(())
}

/// TTL jitter spreads fills: 40 keys filled together get several distinct TTLs, all in range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_are_jittered() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let client = Client::connect(
        &redis.url(),
        Config::default()
            .with_ttl_base_ms(100_000)
            .with_ttl_jitter(0.2),
    )
    .await?;
    let mut ttls = std::collections::BTreeSet::new();
    for i in 0..40 {
        let key = format!("j:{i}");
        let _: i32 = client
            .get_or_load(&key, || async {
                Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(i))
            })
            .await?;
        let t = pttl(&mut r, &format!("{{{key}}}")).await;
        assert!((79_000..=120_000).contains(&t), "{t}");
        ttls.insert(t / 1_000);
    }
    assert!(ttls.len() > 5, "TTLs not spread: {ttls:?}");
    assert_eq!(jittered_ttl_ms(1, 0.5, 0.0), 1);
    Ok(())
}

// ----- other behaviour -----

/// Waiters that reach `lease_wait_ms` load without filling (default) or fail (policy Error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_wait_timeout_policies() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    // Someone else holds the lease and never fills.
    let () = redis::cmd("SET")
        .arg("{w:1}:lease")
        .arg("someone-else")
        .arg("PX")
        .arg(10_000)
        .query_async(&mut r)
        .await?;

    let client = Client::connect(
        &redis.url(),
        quick(Config::default().with_lease_wait_ms(200)),
    )
    .await?;
    let started = Instant::now();
    let v: i32 = client
        .get_or_load("w:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await?;
    assert_eq!(v, 1);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let s = client.stats();
    assert_eq!(
        (
            s.lease_waits,
            s.lease_wait_timeouts,
            s.unfilled_loads,
            s.fills
        ),
        (1, 1, 1, 0),
        "{s:?}"
    );
    assert!(
        !exists(&mut r, "{w:1}").await,
        "a waiter filled without the lease"
    );

    let failing = Client::connect(
        &redis.url(),
        quick(
            Config::default()
                .with_lease_wait_ms(100)
                .with_on_wait_timeout(WaitTimeoutPolicy::Error),
        ),
    )
    .await?;
    let err = failing
        .get_or_load("w:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseWaitTimeout { .. }), "{err:?}");

    // A waiter takes over once the other holder's lease expires, and fills.
    let () = redis::cmd("SET")
        .arg("{w:2}:lease")
        .arg("crashed-holder")
        .arg("PX")
        .arg(150)
        .query_async(&mut r)
        .await?;
    let v: i32 = client
        .get_or_load("w:2", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(2))
        })
        .await?;
    assert_eq!(v, 2);
    assert!(exists(&mut r, "{w:2}").await);
    Ok(())
}

/// Strict reads never touch Redis; `strict_key_prefixes` forces them per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_reads_bypass_the_cache() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let client = Client::connect(
        &redis.url(),
        Config::default().with_strict_key_prefixes(["balance:"]),
    )
    .await?;
    let calls = AtomicUsize::new(0);
    let load = || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(10))
    };
    assert_eq!(client.get_strict(load).await?, 10);
    assert_eq!(client.get_or_load("balance:1", load).await?, 10);
    assert_eq!(client.get_or_load("balance:1", load).await?, 10);
    assert_eq!(
        client
            .get_with("product:1", ReadPolicy::Strict, load)
            .await?,
        10
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(client.stats().strict_loads, 4);
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut r).await?;
    assert_eq!(n, 0);
    Ok(())
}

/// Bad keys get a clear error before anything is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_rejected() -> TestResult {
    let redis = RedisInstance::start()?;
    let client = Client::connect(&redis.url(), Config::default()).await?;
    let err = client
        .get_or_load("a{b}", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidKey(_)), "{err:?}");
    assert!(err.to_string().contains("hash tag"), "{err}");
    let err = client
        .get_or_load("", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidKey(_)), "{err:?}");
    let err = Client::connect(&redis.url(), Config::default().with_ttl_jitter(2.0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ttl_jitter"), "{err}");
    Ok(())
}

/// Undecodable bytes at `{K}` are a miss, and the fill overwrites them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_values_are_misses() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let () = redis::cmd("SET")
        .arg("{d:1}")
        .arg("not json")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut r)
        .await?;
    let client = Client::connect(&redis.url(), Config::default()).await?;
    let v: i32 = client
        .get_or_load("d:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(3))
        })
        .await?;
    assert_eq!(v, 3);
    // Read twice: the miss, and the re-check under the lease.
    assert_eq!(client.stats().decode_errors, 2);
    let stored: String = redis::cmd("GET").arg("{d:1}").query_async(&mut r).await?;
    assert!(stored.starts_with("{\"format\":1,"), "{stored}");
    Ok(())
}

/// A read cancelled while it holds the lease releases it (no lease outlives the read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_read_releases_its_lease() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let gate = Gate::new(HookPoint::LeaseAcquired);
    let client = Client::connect(
        &redis.url(),
        Config::default()
            .with_lease_ms(60_000)
            .with_hook(gate.hook()),
    )
    .await?;
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get_or_load("c:1", || async {
                    Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
                })
                .await
        }
    });
    gate.wait_reached().await;
    assert!(exists(&mut r, "{c:1}:lease").await);
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while exists(&mut r, "{c:1}:lease").await {
        assert!(
            Instant::now() < deadline,
            "the cancelled read's lease was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the key is readable right away by the next caller.
    let v: i32 = client
        .get_or_load("c:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await?;
    assert_eq!(v, 1);
    Ok(())
}

/// XFetch: with a huge β every hit is "near expiry", wins the draw and refreshes early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refreshes_early() -> TestResult {
    let redis = RedisInstance::start()?;
    let client = Client::connect(&redis.url(), Config::default().with_xfetch_beta(1e9)).await?;
    let calls = AtomicUsize::new(0);
    let load = || async {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await; // δ > 0
        Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(n))
    };
    assert_eq!(client.get_or_load("x:1", load).await?, 0);
    assert_eq!(client.get_or_load("x:1", load).await?, 1);
    let s = client.stats();
    assert_eq!((s.early_refreshes, s.fills), (1, 2), "{s:?}");

    // β off (default): a hit is a hit.
    let plain = Client::connect(&redis.url(), Config::default()).await?;
    assert_eq!(plain.get_or_load("x:1", load).await?, 1);
    assert_eq!(plain.stats().hits, 1);
    Ok(())
}

/// The local tier serves its copy until its own TTL, even after an invalidation (its documented
/// extra staleness), and `invalidate_local` drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_tier_staleness_is_bounded_by_its_ttl() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    let client = Client::connect(
        &redis.url(),
        Config::default().with_local_tier(LocalTierConfig::new(1_000, 100)),
    )
    .await?;
    let v: i32 = client
        .get_or_load("l:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(1))
        })
        .await?;
    assert_eq!(v, 1);
    invalidate(&mut r, "l:1", Lsn(1)).await;
    let v: i32 = client
        .get_or_load("l:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(2))
        })
        .await?;
    assert_eq!(v, 1, "served from the local tier");
    assert_eq!(client.stats().local_hits, 1);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let v: i32 = client
        .get_or_load("l:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(2))
        })
        .await?;
    assert_eq!(v, 2, "the local copy expired");
    invalidate(&mut r, "l:1", Lsn(2)).await;
    client.invalidate_local("l:1").await;
    let v: i32 = client
        .get_or_load("l:1", || async {
            Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(3))
        })
        .await?;
    assert_eq!(v, 3);
    Ok(())
}

// ----- one load per invalidation, even when a lease is taken just after a fill -----

/// A reader misses, then (paused) another process loads, fills and releases the lease; when the
/// first reader takes the now-free lease it must find the value instead of loading again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_after_a_fill_does_not_load_again() -> TestResult {
    let redis = RedisInstance::start()?;
    let gate = Gate::new(HookPoint::Missed);
    let paused = Client::connect(
        &redis.url(),
        quick(Config::default().with_hook(gate.hook())),
    )
    .await?;
    let other = Client::connect(&redis.url(), quick(Config::default())).await?;
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = |loads: Arc<AtomicUsize>| {
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(cacheclear_client::Loaded::new(7_i64))
        }
    };

    let first = tokio::spawn({
        let paused = paused.clone();
        let loader = loader(Arc::clone(&loads));
        async move { paused.get_or_load("race:1", loader).await }
    });
    gate.wait_reached().await;
    // Meanwhile another process misses too, takes the lease, loads, fills and releases it.
    assert_eq!(
        other
            .get_or_load("race:1", loader(Arc::clone(&loads)))
            .await?,
        7
    );
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    gate.resume();
    assert_eq!(first.await??, 7);
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the value was loaded twice for one miss"
    );
    assert_eq!(paused.stats().hits, 1);
    let mut conn = redis_conn(&redis).await;
    assert!(
        !exists(&mut conn, "{race:1}:lease").await,
        "the re-checking reader released its lease"
    );
    Ok(())
}

/// Sets namespace `shop`'s epoch 1 and a fresh watermark at `lsn` (the stored format of
/// docs/protocol.md §1, stamped with Redis `TIME`), as the pipeline would.
async fn set_watermark(conn: &mut MultiplexedConnection, lsn: Lsn) {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    let ns = cacheclear_protocol::NamespaceLayout::new("shop").expect("namespace");
    let text = format!("{} 0 5 {} 1", lsn.to_fixed_hex(), s * 1000 + us / 1000);
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(ns.epoch())
        .arg(1)
        .ignore()
        .cmd("SET")
        .arg(ns.watermark())
        .arg(text)
        .arg("PX")
        .arg(600_000)
        .ignore()
        .query_async(conn)
        .await
        .expect("namespace");
}

/// A read-your-writes wait re-reads the namespace with a short backoff (5 ms doubling), not
/// once per `refresh_ms`: with `refresh_ms` = 2 s, a watermark that passes the read's LSN 50 ms
/// after the read started is seen by the polls, and the read is served from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_polls_the_watermark_faster_than_refresh_ms() -> TestResult {
    let redis = RedisInstance::start()?;
    let mut r = redis_conn(&redis).await;
    set_watermark(&mut r, Lsn(0x100)).await;
    let client = Client::connect(
        &redis.url(),
        Config::default().with_staleness(
            cacheclear_client::StalenessConfig::new("shop")
                .with_refresh_ms(2_000)
                .with_read_your_writes_wait_ms(10_000),
        ),
    )
    .await?;
    let load = |v: i64| {
        move || async move { Ok::<_, std::convert::Infallible>(cacheclear_client::Loaded::new(v)) }
    };
    // Cached (epoch 1).
    assert_eq!(client.get_or_load("product:1", load(10)).await?, 10);
    let reads_before = client.stats().namespace_reads;
    let advance = {
        let mut r = r.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            set_watermark(&mut r, Lsn(0x300)).await;
        })
    };
    assert_eq!(
        client
            .get_at_least("product:1", Lsn(0x200), load(99))
            .await?,
        10,
        "served from the cache once the watermark passed"
    );
    advance.await?;
    let stats = client.stats();
    assert_eq!((stats.ryw_waits, stats.ryw_loads), (1, 0));
    assert!(
        stats.namespace_reads - reads_before >= 3,
        "the wait read the namespace {} times (once per refresh_ms would be at most 1 by now)",
        stats.namespace_reads - reads_before
    );
    Ok(())
}

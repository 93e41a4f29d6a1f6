//! Integration tests: real PostgreSQL and Redis servers from the installed binaries.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use cacheclear_harness::{
    HarnessError, PgBinaries, PgInstance, PgOptions, RedisBinaries, RedisInstance, RedisOptions,
    free_port,
};

fn refused(port: u16) -> bool {
    match TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2)) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
    }
}

#[test]
fn pg_starts_with_logical_replication_settings() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    assert_eq!(pg.psql("SHOW wal_level").expect("psql"), "logical");
    assert_eq!(pg.psql("SHOW max_wal_senders").expect("psql"), "10");
    assert_eq!(pg.psql("SHOW max_replication_slots").expect("psql"), "10");
    assert_eq!(pg.psql("SHOW listen_addresses").expect("psql"), "127.0.0.1");
    assert_eq!(pg.psql("SELECT current_user").expect("psql"), "postgres");
    assert_ne!(pg.port(), 5432);
    assert_eq!(pg.host(), "127.0.0.1");
    assert_eq!(pg.user(), "postgres");
    assert_eq!(pg.dbname(), "postgres");
    assert_eq!(
        pg.conn_string(),
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            pg.port()
        )
    );
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert!(pg.data_dir().join("PG_VERSION").exists());
    // A logical slot with pgoutput can be created: replication really works.
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM pg_create_logical_replication_slot('harness_test', 'pgoutput')"
        )
        .expect("create slot"),
        "1"
    );
    // Multi-row output: one row per line.
    assert_eq!(
        pg.psql("SELECT g FROM generate_series(1, 3) g")
            .expect("psql"),
        "1\n2\n3"
    );
}

#[test]
fn pg_replication_connection_is_trusted() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    // A physical replication connection over TCP: IDENTIFY_SYSTEM needs the replication hba line.
    let out = std::process::Command::new(&pg.binaries().psql)
        .args(["-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM"])
        .arg(format!("{} replication=database", pg.conn_string()))
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "replication connection failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pg_sql_errors_are_reported_with_the_statement() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    let err = pg
        .psql("SELECT * FROM no_such_table")
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::Sql { .. }), "{err:?}");
    assert!(msg.contains("no_such_table"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn pg_extra_conf_is_applied_and_bad_conf_explains_itself() {
    let pg = PgInstance::start_with(PgOptions::default().conf("max_slot_wal_keep_size = '64MB'"))
        .expect("start PostgreSQL");
    assert_eq!(
        pg.psql("SHOW max_slot_wal_keep_size").expect("psql"),
        "64MB"
    );
    drop(pg);

    let err = PgInstance::start_with(PgOptions::default().conf("no_such_setting = 1"))
        .expect_err("bad conf must fail");
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::ServerExited { .. }), "{err:?}");
    assert!(msg.contains("no_such_setting"), "log tail missing: {msg}");
}

#[test]
fn two_pg_instances_in_parallel_get_different_ports_and_both_work() {
    let handles: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                let pg = PgInstance::start().expect("start PostgreSQL");
                pg.psql(&format!(
                    "CREATE TABLE t{i} (id int); INSERT INTO t{i} VALUES ({i})"
                ))
                .expect("create");
                pg
            })
        })
        .collect();
    let pgs: Vec<PgInstance> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_ne!(pgs[0].port(), pgs[1].port());
    assert_ne!(pgs[0].data_dir(), pgs[1].data_dir());
    assert_eq!(pgs[0].psql("SELECT id FROM t0").expect("t0"), "0");
    assert_eq!(pgs[1].psql("SELECT id FROM t1").expect("t1"), "1");
    // Each has only its own table.
    assert!(pgs[0].psql("SELECT id FROM t1").is_err());
}

#[test]
fn pg_drop_removes_dir_and_closes_port() {
    let pg = PgInstance::start().expect("start PostgreSQL");
    let port = pg.port();
    let dir = pg.data_dir().to_path_buf();
    let root = dir.parent().expect("temp root").to_path_buf();
    assert!(dir.exists());
    assert!(!refused(port));
    drop(pg);
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(refused(port), "port {port} still accepts connections");
}

#[test]
fn pg_stop_and_restart_keep_port_and_data() {
    let mut pg = PgInstance::start().expect("start PostgreSQL");
    let port = pg.port();
    pg.psql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        .expect("create");
    pg.stop().expect("stop");
    assert!(!pg.is_running());
    assert!(refused(port));
    let err = pg.psql("SELECT 1").expect_err("stopped");
    assert!(err.to_string().contains("restart()"), "{err}");
    pg.stop().expect("second stop is a no-op");
    pg.restart().expect("restart");
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("SELECT v FROM kept").expect("select"), "still here");
    // restart() while running also works.
    pg.restart().expect("restart while running");
    assert_eq!(pg.psql("SELECT v FROM kept").expect("select"), "still here");
}

#[test]
fn redis_start_ping_and_url() {
    let redis = RedisInstance::start().expect("start Redis");
    assert_ne!(redis.port(), 6379);
    assert_eq!(redis.cli(&["PING"]).expect("ping"), "PONG");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert_eq!(redis.cli(&["SET", "k", "v"]).expect("set"), "OK");
    assert_eq!(redis.cli(&["GET", "k"]).expect("get"), "v");
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "save"]).expect("cfg"),
        "save\n"
    );
    let err = redis.cli(&["NOSUCHCOMMAND"]).expect_err("error reply");
    assert!(err.to_string().contains("unknown command"), "{err}");
}

#[test]
fn redis_stop_refuses_then_start_again_on_same_port() {
    let mut redis = RedisInstance::start().expect("start Redis");
    let port = redis.port();
    redis.cli(&["SET", "k", "v"]).expect("set");
    redis.stop().expect("stop");
    assert!(!redis.is_running());
    assert!(refused(port), "port {port} should refuse connections");
    let err = redis.cli(&["PING"]).expect_err("down");
    assert!(err.to_string().contains("start_again()"), "{err}");
    // The port is reserved while stopped: nobody else can listen on it.
    assert!(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err());
    redis.start_again().expect("start again");
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cli(&["PING"]).expect("ping"), "PONG");
    assert_eq!(
        redis.cli(&["GET", "k"]).expect("get"),
        "",
        "data starts empty"
    );
}

#[test]
fn redis_drop_removes_dir_and_closes_port() {
    let redis = RedisInstance::start().expect("start Redis");
    let port = redis.port();
    let dir = redis.dir().to_path_buf();
    assert!(dir.exists());
    drop(redis);
    assert!(!dir.exists());
    assert!(refused(port));
}

#[test]
fn redis_extra_args_apply_and_bad_args_explain_themselves() {
    let redis = RedisInstance::start_with(
        RedisOptions::default().args(["--maxmemory-policy", "volatile-lfu"]),
    )
    .expect("start Redis");
    assert_eq!(
        redis
            .cli(&["CONFIG", "GET", "maxmemory-policy"])
            .expect("cfg"),
        "maxmemory-policy\nvolatile-lfu"
    );
    drop(redis);
    let err = RedisInstance::start_with(RedisOptions::default().args(["--no-such-option", "1"]))
        .expect_err("bad arg");
    assert!(matches!(err, HarnessError::ServerExited { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-option"), "{err}");
}

#[test]
fn many_redis_instances_in_parallel() {
    let handles: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(|| RedisInstance::start().expect("start Redis")))
        .collect();
    let all: Vec<RedisInstance> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let mut ports: Vec<u16> = all.iter().map(RedisInstance::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), all.len());
    for r in &all {
        assert_eq!(r.cli(&["PING"]).expect("ping"), "PONG");
    }
}

#[test]
fn missing_binaries_give_install_instructions() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = PgBinaries::discover_with(Some(empty.path().as_os_str())).expect_err("missing");
    let msg = err.to_string();
    assert!(
        matches!(err, HarnessError::BinaryNotFound { .. }),
        "{err:?}"
    );
    assert!(msg.contains("initdb"), "{msg}");
    assert!(msg.contains("apt-get install postgresql"), "{msg}");
    assert!(msg.contains("CACHECLEAR_PG_BIN"), "{msg}");
    assert!(msg.contains(&empty.path().display().to_string()), "{msg}");

    let err = RedisBinaries::discover_with(Some(empty.path().as_os_str())).expect_err("missing");
    let msg = err.to_string();
    assert!(msg.contains("apt-get install redis-server"), "{msg}");

    // And the machine this runs on has everything.
    PgBinaries::discover_with(None).expect("PostgreSQL installed");
    RedisBinaries::discover_with(None).expect("Redis installed");
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let a = free_port().expect("port");
    let b = free_port().expect("port");
    assert_ne!(a, b);
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, a)).expect("bind a");
}

const HOLDER_ENV: &str = "CACHECLEAR_HARNESS_TEST_HOLDER";

/// Not a test on its own: run by `servers_die_with_their_owner_process` in a child process.
#[test]
#[ignore = "helper process for servers_die_with_their_owner_process"]
fn holder_process() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let pg = PgInstance::start().expect("start PostgreSQL");
    let redis = RedisInstance::start().expect("start Redis");
    println!(
        "HOLDING {} {} {} {} {}",
        pg.pid().expect("pg pid"),
        redis.pid().expect("redis pid"),
        pg.port(),
        redis.port(),
        pg.data_dir().parent().expect("root").display(),
    );
    println!("HOLDING-REDIS-DIR {}", redis.dir().display());
    std::thread::sleep(Duration::from_secs(120));
}

fn process_gone(pid: u32) -> bool {
    // Gone, or a zombie waiting for a reaper (our container's init may not reap).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[test]
fn servers_die_with_their_owner_process() {
    use std::io::BufRead;
    let exe = std::env::current_exe().expect("current exe");
    let mut holder = std::process::Command::new(exe)
        .args([
            "--exact",
            "holder_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn holder");
    let stdout = holder.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut holding = None;
    let mut redis_dir = None;
    for line in lines.by_ref() {
        let line = line.expect("read holder output");
        // libtest prints "test holder_process ... " right before our output, on the same line.
        if let Some((_, rest)) = line.split_once("HOLDING ") {
            holding = Some(rest.to_string());
        } else if let Some((_, rest)) = line.split_once("HOLDING-REDIS-DIR ") {
            redis_dir = Some(rest.to_string());
            break;
        }
    }
    let holding = holding.expect("holder reported its servers");
    let fields: Vec<&str> = holding.split_whitespace().collect();
    let pg_pid: u32 = fields[0].parse().expect("pid");
    let redis_pid: u32 = fields[1].parse().expect("pid");
    let pg_port: u16 = fields[2].parse().expect("port");
    let redis_port: u16 = fields[3].parse().expect("port");
    assert!(!process_gone(pg_pid) && !process_gone(redis_pid));

    // SIGKILL the owner: no Drop runs. The servers must still go away.
    holder.kill().expect("kill holder");
    holder.wait().expect("reap holder");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(process_gone(pg_pid) && process_gone(redis_pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "servers outlived their owner: postgres {pg_pid} gone={}, redis {redis_pid} gone={}",
            process_gone(pg_pid),
            process_gone(redis_pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused(pg_port));
    assert!(refused(redis_port));
    // Without Drop the directories stay (documented); clean them up here.
    let _ = std::fs::remove_dir_all(fields[4]);
    if let Some(d) = redis_dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn instances_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PgInstance>();
    assert_send_sync::<RedisInstance>();
    assert_send_sync::<HarnessError>();
}

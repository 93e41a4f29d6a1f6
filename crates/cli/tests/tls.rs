//! PostgreSQL over TLS only (`ssl = on`, `hostssl`-only `pg_hba.conf`, certificates made here):
//! `sslmode=verify-full` with the right CA streams and evicts; a wrong CA, a wrong host name and
//! a plaintext connection stop `cacheclear run` at once with the reason, instead of retrying. The
//! client library's `connect_postgres` takes the same parameters.

mod common;

use std::path::Path;
use std::time::Duration;

use cacheclear_harness::{PgOptions, TestCertificates};
use common::*;

/// The shared test certificates (`cacheclear_harness::TestCertificates`), the server
/// certificate for `localhost` only (so `127.0.0.1` is a wrong host name), readable by
/// PostgreSQL.
struct Certs(TestCertificates);

impl Certs {
    fn make() -> Certs {
        let certs = TestCertificates::generate_for(&["localhost"]).expect("certificates");
        if let Some((uid, gid)) = postgres_user() {
            certs
                .chown_server_files(uid, gid)
                .expect("chown to postgres");
        }
        Certs(certs)
    }

    fn path(&self, name: &str) -> String {
        self.0.dir().join(name).display().to_string()
    }
}

/// As root the harness runs PostgreSQL as `postgres`: its uid and gid.
fn postgres_user() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = std::process::Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?))
}

/// A TLS-only PostgreSQL: `ssl = on` with the test certificates, `hostssl` lines only.
fn tls_only_env(certs: &Certs) -> Env {
    let env = Env::start_with(
        PgOptions::default()
            .conf("ssl = on")
            .conf(format!("ssl_cert_file = '{}'", certs.path("server.crt")))
            .conf(format!("ssl_key_file = '{}'", certs.path("server.key"))),
    );
    std::fs::write(
        env.pg.data_dir().join("pg_hba.conf"),
        "local   all         all                trust\n\
         local   replication all                trust\n\
         hostssl all         all  127.0.0.1/32  trust\n\
         hostssl replication all  127.0.0.1/32  trust\n",
    )
    .expect("pg_hba.conf");
    env.pg.psql("SELECT pg_reload_conf()").expect("reload");
    env
}

fn url(env: &Env, host: &str, params: &str) -> String {
    format!(
        "postgres://postgres@{host}:{}/postgres?{params}",
        env.pg.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_over_tls() {
    let certs = Certs::make();
    let env = tls_only_env(&certs);
    let mut pg = env.pg_config();
    pg.url = url(
        &env,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.crt")),
    );
    let mut pipeline = spawn_pipeline(pg, env.redis_config(), product_rules());
    streaming(&mut pipeline).await;
    let mut r = env.redis().await;
    set(&mut r, "{product:7}", "cached").await;
    // The test's own connection over TLS too (plaintext is refused by pg_hba.conf).
    env.pg
        .psql("UPDATE product SET price_cents = 1 WHERE id = 7")
        .expect("update");
    gone(
        &mut r,
        Duration::from_secs(30),
        "product:7",
        "the eviction over TLS",
    )
    .await;
    let ssl: String = env
        .pg
        .psql("SELECT bool_and(ssl)::text FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE application_name = 'cacheclear' OR backend_type = 'walsender'")
        .expect("pg_stat_ssl");
    assert!(
        ssl.contains("true"),
        "the pipeline's connections use TLS: {ssl}"
    );
    pipeline.stop().await.expect("stop");
}

/// `cacheclear run` with `params` exits (does not retry forever) and prints `expect`.
fn run_refused(env: &Env, certs: &Certs, host: &str, params: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_toml(env, "", "", "").replace(
        &format!("url = \"{}\"", env.pg.url()),
        &format!("url = \"{}\"", url(env, host, params)),
    );
    let path = write_file(dir.path(), "c.toml", &text);
    let (status, _out, err) = run_to_end(
        command(&["run".as_ref(), "--config".as_ref(), path.as_os_str()]),
        Duration::from_secs(60),
    );
    let status = status.unwrap_or_else(|| panic!("`run` still retrying after 60 s: {err}"));
    assert!(!status.success(), "{err}");
    for e in expect {
        assert!(err.to_lowercase().contains(e), "`{e}` in: {err}");
    }
    let _ = certs;
}

#[test]
fn a_wrong_ca_a_wrong_host_name_and_plaintext_stop_at_once() {
    let certs = Certs::make();
    let env = tls_only_env(&certs);
    run_refused(
        &env,
        &certs,
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.path("other-ca.crt")
        ),
        &["certificate"],
    );
    run_refused(
        &env,
        &certs,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.crt")),
        &["certificate"],
    );
    run_refused(
        &env,
        &certs,
        "localhost",
        "sslmode=disable",
        &["pg_hba.conf"],
    );
    assert!(Path::new(&certs.path("ca.crt")).exists());
}

/// The client library's `connect_postgres` (what applications' loaders use) takes the same
/// parameters: verify-full with the right CA reads over TLS; a wrong CA and a wrong host name
/// fail with an error that says the certificate failed verification and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_connects_with_verify_full() {
    let certs = Certs::make();
    let env = tls_only_env(&certs);
    let good = url(
        &env,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", certs.path("ca.crt")),
    );
    let db = cacheclear_client::connect_postgres(&good)
        .await
        .expect("verify-full with the right CA connects");
    let ssl: bool = db
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    assert!(ssl, "the client's connection is encrypted");

    for (host, ca, what) in [
        ("localhost", "other-ca.crt", "a wrong CA"),
        ("127.0.0.1", "ca.crt", "a wrong host name"),
    ] {
        let bad = url(
            &env,
            host,
            &format!("sslmode=verify-full&sslrootcert={}", certs.path(ca)),
        );
        let err = cacheclear_client::connect_postgres(&bad)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} is refused"));
        assert!(
            matches!(err, cacheclear_client::PgConnectError::Certificate { .. }),
            "{what}: {err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("TLS certificate failed verification") && text.contains("sslrootcert"),
            "{what}: {text}"
        );
    }
    // A plaintext connection is refused by the hostssl-only pg_hba.conf.
    let err = cacheclear_client::connect_postgres(&url(&env, "localhost", "sslmode=disable"))
        .await
        .err()
        .expect("plaintext is refused");
    assert!(err.to_string().contains("pg_hba.conf"), "{err}");
    // An unknown sslmode is a config error naming the parameter.
    let err = cacheclear_client::connect_postgres(&url(&env, "localhost", "sslmode=sometimes"))
        .await
        .err()
        .expect("bad sslmode");
    assert!(
        matches!(err, cacheclear_client::PgConnectError::Config(_)),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("url: sslmode `sometimes`"),
        "{err}"
    );
}

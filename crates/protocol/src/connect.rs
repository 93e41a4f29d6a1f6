//! The one place that opens Redis connections: URLs, TLS (`rediss://` and the `[redis.tls]`
//! table), ACL credentials, Redis Cluster seed lists and Redis Sentinel. The sink, the
//! invalidator, `cacheclear doctor`, the client library and the demo all build their
//! connections here, so a setting means the same thing everywhere.
//!
//! - **Standalone**: [`RedisTarget::connect_lazy`] / [`RedisTarget::connect`] give a
//!   [`RedisConnection`] (an auto-reconnecting multiplexed connection).
//! - **Cluster**: [`cluster_client_builder`] gives a `ClusterClientBuilder` with the credentials
//!   of the seed URLs (used for every node the client discovers) and the TLS settings.
//! - **Sentinel**: a [`RedisTarget`] with [`RedisTarget::sentinel`] set resolves the master
//!   through the sentinels (`SENTINEL GET-MASTER-ADDR-BY-NAME`), checks it answers `ROLE` as
//!   `master`, and resolves again after a connection error or a `READONLY` reply, so the next
//!   attempt goes to the master the sentinels promoted.
//!
//! Credentials live in the URLs (`rediss://user:password@host:port/`); every URL that is
//! printed goes through [`redact_url`] first. Errors that retrying cannot fix — a refused
//! password (`WRONGPASS`), a user without a permission (`NOPERM`), a certificate that fails
//! verification — are recognised by [`is_fatal`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, RedisError, RedisFuture, RedisResult, ServerErrorKind, TlsCertificates,
    Value,
};

use crate::{ConfigError, redact_url};

/// `[redis.tls]`: TLS settings of every Redis connection whose URL is `rediss://` (in the style
/// of Vector's `tls` options). The table only adds to a `rediss://` URL; with a `redis://` URL it
/// is refused (say `rediss://` to encrypt). Without the table a `rediss://` URL verifies the
/// server against the Mozilla root certificates (webpki-roots), host name included — what
/// ElastiCache, MemoryDB and Azure Cache for Redis need.
///
/// ```toml
/// [redis.tls]
/// ca_file = "/etc/cacheclear/redis-ca.pem"      # default: the Mozilla roots
/// crt_file = "/etc/cacheclear/client.pem"       # client certificate (mutual TLS), with key_file
/// key_file = "/etc/cacheclear/client.key"
/// verify_certificate = true                     # default true
/// verify_hostname = true                        # default true
/// ```
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// PEM file of the certificate authorities that sign the server's certificate; replaces the
    /// Mozilla roots. Default: none (the Mozilla roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain) for servers that ask for one
    /// (`tls-auth-clients yes`). Needs `key_file`. Default: none.
    #[serde(default)]
    pub crt_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key. Needs `crt_file`. Default: none.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Check the server's certificate chain. Default `true`; `false` accepts any certificate
    /// (encrypted, but open to a man in the middle: for tests only).
    #[serde(default = "yes")]
    pub verify_certificate: bool,
    /// Check that the certificate names the host of the URL. Default `true`; `false` for servers
    /// reached by an address their certificate does not name (an IP, a tunnel).
    #[serde(default = "yes")]
    pub verify_hostname: bool,
}

fn yes() -> bool {
    true
}

impl Default for RedisTls {
    fn default() -> Self {
        RedisTls {
            ca_file: None,
            crt_file: None,
            key_file: None,
            verify_certificate: true,
            verify_hostname: true,
        }
    }
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only: never the files' contents.
        f.debug_struct("RedisTls")
            .field("ca_file", &self.ca_file)
            .field("crt_file", &self.crt_file)
            .field("key_file", &self.key_file)
            .field("verify_certificate", &self.verify_certificate)
            .field("verify_hostname", &self.verify_hostname)
            .finish()
    }
}

impl RedisTls {
    /// The table with a CA file, everything else default.
    pub fn with_ca_file(ca_file: impl Into<PathBuf>) -> RedisTls {
        RedisTls {
            ca_file: Some(ca_file.into()),
            ..RedisTls::default()
        }
    }

    /// Reads and checks the PEM files. `section` is the dotted path of the table for errors
    /// (`redis.tls`).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field and the path (never the contents) of a file that
    /// cannot be read or holds no certificate / key, and for `crt_file` without `key_file`.
    pub fn certificates(&self, section: &str) -> Result<TlsCertificates, ConfigError> {
        let root_cert = match &self.ca_file {
            Some(path) => {
                let pem = read_pem(section, "ca_file", path)?;
                check_pem(section, "ca_file", path, &pem, PemKind::Certificate)?;
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.crt_file, &self.key_file) {
            (Some(crt), Some(key)) => {
                let client_cert = read_pem(section, "crt_file", crt)?;
                check_pem(section, "crt_file", crt, &client_cert, PemKind::Certificate)?;
                let client_key = read_pem(section, "key_file", key)?;
                check_pem(section, "key_file", key, &client_key, PemKind::Key)?;
                Some(ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    format!("{section}.key_file"),
                    "missing: crt_file (a client certificate) needs its private key in key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{section}.crt_file"),
                    "missing: key_file needs the client certificate in crt_file",
                ));
            }
        };
        Ok(TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

fn read_pem(section: &str, field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        ConfigError::new(
            format!("{section}.{field}"),
            format!("cannot read `{}`: {e}", path.display()),
        )
    })
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    Key,
}

fn check_pem(
    section: &str,
    field: &str,
    path: &Path,
    pem: &[u8],
    kind: PemKind,
) -> Result<(), ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let error = |what: String| {
        ConfigError::new(
            format!("{section}.{field}"),
            format!("`{}` {what}", path.display()),
        )
    };
    match kind {
        PemKind::Certificate => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(format!("is not a PEM certificate file: {e}")))?;
            if certs.is_empty() {
                return Err(error(
                    "holds no certificate (expected `-----BEGIN CERTIFICATE-----` blocks)".into(),
                ));
            }
            if field == "ca_file" {
                let mut store = rustls::RootCertStore::empty();
                for cert in certs {
                    store
                        .add(cert)
                        .map_err(|e| error(format!("holds a certificate that is not a CA: {e}")))?;
                }
            }
        }
        PemKind::Key => {
            PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
                error(format!(
                    "holds no private key (expected a PEM `PRIVATE KEY` block): {e}"
                ))
            })?;
        }
    }
    Ok(())
}

/// `[redis] sentinel = { ... }`: reach the master of a Redis Sentinel deployment.
///
/// ```toml
/// [redis]
/// sentinel = { master = "mymaster", urls = ["rediss://:sentinel-pw@10.0.0.1:26379/", "rediss://10.0.0.2:26379/"], username = "cacheclear", password = "data-pw" }
/// ```
///
/// - `urls`: the sentinels. Their scheme decides TLS for the sentinels *and* the master
///   (`rediss://`: both, with `[redis.tls]`); their user info authenticates to the sentinels
///   (`requirepass` / `sentinel sentinel-user`).
/// - `username` / `password`: the ACL user (or `requirepass` password) of the master.
/// - `db`: the database of the master. Default 0.
///
/// The master is asked for on the first connection and again after every connection error or
/// `READONLY` reply (a failover demoted the node), so a retried write goes to the new master.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSentinel {
    /// The monitored master's name (`sentinel monitor <name> ...`). Required.
    pub master: String,
    /// Sentinel URLs, `redis[s]://[user:password@]host:port/`. At least one; list every sentinel
    /// so one being down does not matter.
    #[serde(default)]
    pub urls: Vec<String>,
    /// ACL user name on the master (and its replicas). Default: none (`default` user).
    #[serde(default)]
    pub username: Option<String>,
    /// Password on the master. Default: none. Never logged.
    #[serde(default)]
    pub password: Option<String>,
    /// Database on the master. Default 0.
    #[serde(default)]
    pub db: i64,
}

impl std::fmt::Debug for RedisSentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSentinel")
            .field("master", &self.master)
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

impl RedisSentinel {
    /// Sentinels `urls` monitoring `master`; no master credentials, database 0.
    pub fn new<I, S>(master: impl Into<String>, urls: I) -> RedisSentinel
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisSentinel {
            master: master.into(),
            urls: urls.into_iter().map(Into::into).collect(),
            username: None,
            password: None,
            db: 0,
        }
    }

    /// Sets the master's ACL user and password.
    #[must_use]
    pub fn with_credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        self.username = username;
        self.password = password;
        self
    }
}

/// Installs rustls's `ring` provider as the process default unless one is installed already.
/// Both `ring` and `aws-lc-rs` are compiled into the workspace, so rustls cannot choose one by
/// itself and would panic at the first TLS handshake. Every builder in this module calls it;
/// call it yourself before building `redis` clients any other way.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: another part of the process installed one first; that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Parses `url` (`redis://`, `rediss://`, `redis+unix://`) and applies `tls`. `field` names the
/// URL in errors (`redis.url`, `redis.urls[2]`).
///
/// # Errors
/// A [`ConfigError`] for a malformed URL, a `[redis.tls]` table with a `redis://` URL, or
/// certificate files that cannot be used.
pub fn connection_info(
    url: &str,
    tls: Option<&RedisTls>,
    field: &str,
    tls_section: &str,
) -> Result<ConnectionInfo, ConfigError> {
    install_crypto_provider();
    let info = url.into_connection_info().map_err(|e| {
        ConfigError::new(
            field.to_owned(),
            format!("`{}` is not a Redis URL: {e}", redact_url(url)),
        )
    })?;
    apply_tls(info, tls, field, tls_section, url)
}

fn apply_tls(
    info: ConnectionInfo,
    tls: Option<&RedisTls>,
    field: &str,
    tls_section: &str,
    url: &str,
) -> Result<ConnectionInfo, ConfigError> {
    let Some(tls) = tls else {
        return Ok(info);
    };
    let (host, port) = match info.addr() {
        ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
        _ => {
            return Err(ConfigError::new(
                field.to_owned(),
                format!(
                    "`{}` is not a TLS URL, but [{tls_section}] is set: write rediss:// to \
                     connect over TLS (or remove the [{tls_section}] table)",
                    redact_url(url)
                ),
            ));
        }
    };
    let certs = tls.certificates(tls_section)?;
    let addr = ConnectionAddr::TcpTls {
        host,
        port,
        insecure: !tls.verify_certificate,
        tls_params: None,
    };
    let client = redis::Client::build_with_tls(info.set_addr(addr), certs)
        .map_err(|e| ConfigError::new(tls_section.to_owned(), e.to_string()))?;
    let info = client.get_connection_info().clone();
    if tls.verify_hostname || !tls.verify_certificate {
        return Ok(info);
    }
    let mut addr = info.addr().clone();
    addr.set_danger_accept_invalid_hostnames(true);
    Ok(info.set_addr(addr))
}

/// A `redis::Client` for `url` with `tls` applied (see [`connection_info`]).
///
/// # Errors
/// As [`connection_info`].
pub fn client(
    url: &str,
    tls: Option<&RedisTls>,
    field: &str,
    tls_section: &str,
) -> Result<redis::Client, ConfigError> {
    let info = connection_info(url, tls, field, tls_section)?;
    redis::Client::open(info).map_err(|e| ConfigError::new(field.to_owned(), e.to_string()))
}

/// A Redis Cluster client builder for the seed `urls`, with `tls` applied. The user name and
/// password of the first seed (all seeds must carry the same) authenticate to every node the
/// client discovers; a `rediss://` seed makes every node connection TLS with the same
/// certificates. `field` names the list in errors (`redis.urls`).
///
/// # Errors
/// A [`ConfigError`] for a malformed URL (naming its index), seeds with different credentials
/// or schemes, or unusable certificate files.
pub fn cluster_client_builder(
    urls: &[String],
    tls: Option<&RedisTls>,
    field: &str,
    tls_section: &str,
) -> Result<redis::cluster::ClusterClientBuilder, ConfigError> {
    install_crypto_provider();
    let mut infos = Vec::with_capacity(urls.len());
    for (i, url) in urls.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let info = url.as_str().into_connection_info().map_err(|e| {
            ConfigError::new(
                f.clone(),
                format!("`{}` is not a Redis URL: {e}", redact_url(url)),
            )
        })?;
        infos.push((f, url, info));
    }
    let Some((_, _, first)) = infos.first() else {
        return Err(ConfigError::new(
            field.to_owned(),
            "at least one seed node is needed",
        ));
    };
    let first_tls = matches!(first.addr(), ConnectionAddr::TcpTls { .. });
    let (user, password) = (
        first.redis_settings().username().map(str::to_owned),
        first.redis_settings().password().map(str::to_owned),
    );
    for (f, url, info) in &infos {
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) != first_tls {
            return Err(ConfigError::new(
                f.clone(),
                format!(
                    "`{}`: every seed node needs the same scheme (all rediss:// or all redis://)",
                    redact_url(url)
                ),
            ));
        }
        if info.redis_settings().username() != user.as_deref()
            || info.redis_settings().password() != password.as_deref()
        {
            return Err(ConfigError::new(
                f.clone(),
                format!(
                    "`{}`: every seed node needs the same user and password (they authenticate \
                     to every node of the cluster)",
                    redact_url(url)
                ),
            ));
        }
    }
    let mut builder =
        redis::cluster::ClusterClientBuilder::new(infos.iter().map(|(_, _, info)| info.clone()));
    if let Some(user) = &user {
        builder = builder.username(user);
    }
    if let Some(password) = &password {
        builder = builder.password(password);
    }
    match tls {
        Some(tls) if first_tls => {
            builder = builder
                .tls(if tls.verify_certificate {
                    redis::TlsMode::Secure
                } else {
                    redis::TlsMode::Insecure
                })
                .certs(tls.certificates(tls_section)?)
                .danger_accept_invalid_hostnames(tls.verify_certificate && !tls.verify_hostname);
        }
        Some(_) => {
            return Err(ConfigError::new(
                field.to_owned(),
                format!(
                    "the seed nodes are not TLS URLs, but [{tls_section}] is set: write \
                     rediss:// to connect over TLS (or remove the [{tls_section}] table)"
                ),
            ));
        }
        None => {}
    }
    Ok(builder)
}

/// Where a standalone or Sentinel-managed Redis is, and how to reach it: the `url`, `sentinel`
/// and `tls` fields of a `[redis]` section. Exactly one of `url` and `sentinel` is set.
#[derive(Clone, Default)]
pub struct RedisTarget {
    /// `redis[s]://[user:password@]host:port[/db]`; empty with `sentinel`.
    pub url: String,
    /// The sentinels to ask for the master; `None` for a fixed address.
    pub sentinel: Option<RedisSentinel>,
    /// `[redis.tls]`, for `rediss://` URLs.
    pub tls: Option<RedisTls>,
    /// The dotted path of the section, for errors (`redis`).
    pub section: String,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL redacted: it may carry a password.
        f.debug_struct("RedisTarget")
            .field("url", &redact_url(&self.url))
            .field("sentinel", &self.sentinel)
            .field("tls", &self.tls)
            .field("section", &self.section)
            .finish()
    }
}

/// Timeouts of a [`RedisConnection`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectTimeouts {
    /// Bound of one connection attempt (TCP, TLS handshake, `AUTH`).
    pub connect: Duration,
    /// Bound of one command or pipeline round trip.
    pub response: Duration,
}

impl RedisTarget {
    /// A fixed address.
    pub fn url(url: impl Into<String>) -> RedisTarget {
        RedisTarget {
            url: url.into(),
            sentinel: None,
            tls: None,
            section: "redis".into(),
        }
    }

    /// The master of a Sentinel deployment.
    pub fn sentinel(sentinel: RedisSentinel) -> RedisTarget {
        RedisTarget {
            url: String::new(),
            sentinel: Some(sentinel),
            tls: None,
            section: "redis".into(),
        }
    }

    /// Sets the `[redis.tls]` table.
    #[must_use]
    pub fn with_tls(mut self, tls: Option<RedisTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the section name used in errors (default `redis`).
    #[must_use]
    pub fn with_section(mut self, section: impl Into<String>) -> Self {
        self.section = section.into();
        self
    }

    /// What to print for this target: the redacted URL, or `sentinel <master> via <urls>`.
    pub fn display(&self) -> String {
        match &self.sentinel {
            Some(s) => format!(
                "sentinel master `{}` via {}",
                s.master,
                s.urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => redact_url(&self.url),
        }
    }

    /// Checks the URLs, the sentinel table and the certificate files (reads them).
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.link().map(|_| ())
    }

    fn link(&self) -> Result<Link, ConfigError> {
        let section = &self.section;
        let tls_section = format!("{section}.tls");
        match &self.sentinel {
            None => {
                let info = connection_info(
                    &self.url,
                    self.tls.as_ref(),
                    &format!("{section}.url"),
                    &tls_section,
                )?;
                Ok(Link::Direct(Box::new(info)))
            }
            Some(sentinel) => {
                if !self.url.is_empty() {
                    return Err(ConfigError::new(
                        format!("{section}.url"),
                        format!(
                            "with {section}.sentinel the master's address comes from the \
                             sentinels: leave url unset (`{}`), put the master's credentials in \
                             sentinel.username / sentinel.password",
                            redact_url(&self.url)
                        ),
                    ));
                }
                if sentinel.master.is_empty() {
                    return Err(ConfigError::new(
                        format!("{section}.sentinel.master"),
                        "missing: the master's name as the sentinels know it \
                         (`sentinel monitor <name> ...`), e.g. master = \"mymaster\"",
                    ));
                }
                if sentinel.urls.is_empty() {
                    return Err(ConfigError::new(
                        format!("{section}.sentinel.urls"),
                        "at least one sentinel is needed, e.g. \
                         urls = [\"redis://10.0.0.1:26379/\", \"redis://10.0.0.2:26379/\"]",
                    ));
                }
                let mut sentinels = Vec::new();
                let mut tls_scheme = None;
                for (i, url) in sentinel.urls.iter().enumerate() {
                    let field = format!("{section}.sentinel.urls[{i}]");
                    let info = connection_info(url, self.tls.as_ref(), &field, &tls_section)?;
                    let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
                    if *tls_scheme.get_or_insert(is_tls) != is_tls {
                        return Err(ConfigError::new(
                            field,
                            "every sentinel needs the same scheme (all rediss:// or all \
                             redis://): it decides TLS for the master too",
                        ));
                    }
                    sentinels.push(info);
                }
                Ok(Link::Sentinel(Box::new(SentinelLink {
                    sentinels,
                    master: sentinel.master.clone(),
                    username: sentinel.username.clone(),
                    password: sentinel.password.clone(),
                    db: sentinel.db,
                    tls: if tls_scheme == Some(true) {
                        Some(self.tls.clone().unwrap_or_default())
                    } else {
                        None
                    },
                    tls_section,
                    timeouts: ConnectTimeouts {
                        connect: Duration::from_secs(5),
                        response: Duration::from_secs(5),
                    },
                    current: tokio::sync::Mutex::new(None),
                })))
            }
        }
    }

    /// A connection that connects on first use (the server may be down now) and reconnects by
    /// itself; with a sentinel, it asks the sentinels for the master on every (re)connection.
    /// `manager` configures the standalone connection manager's retries; its timeouts are
    /// replaced by `timeouts`.
    ///
    /// # Errors
    /// A [`ConfigError`] as [`RedisTarget::validate`].
    pub fn connect_lazy(
        &self,
        timeouts: ConnectTimeouts,
        manager: ConnectionManagerConfig,
    ) -> Result<RedisConnection, ConfigError> {
        match self.link()? {
            Link::Direct(info) => {
                let client = redis::Client::open(*info).map_err(|e| {
                    ConfigError::new(format!("{}.url", self.section), e.to_string())
                })?;
                let manager = manager
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response));
                let conn =
                    ConnectionManager::new_lazy_with_config(client, manager).map_err(|e| {
                        ConfigError::new(format!("{}.url", self.section), e.to_string())
                    })?;
                Ok(RedisConnection::Direct(conn))
            }
            Link::Sentinel(mut link) => {
                link.timeouts = timeouts;
                Ok(RedisConnection::Sentinel(Arc::from(link)))
            }
        }
    }

    /// Like [`RedisTarget::connect_lazy`], then connects now (a `PING`), so a wrong address,
    /// password or certificate is reported here.
    ///
    /// # Errors
    /// [`ConnectError::Config`] for the configuration, [`ConnectError::Redis`] when the server
    /// cannot be reached or refuses us.
    pub async fn connect(
        &self,
        timeouts: ConnectTimeouts,
        manager: ConnectionManagerConfig,
    ) -> Result<RedisConnection, ConnectError> {
        let mut conn = self.connect_lazy(timeouts, manager)?;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        if pong != "PONG" {
            return Err(ConnectError::Redis(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "PING did not answer PONG",
                pong,
            ))));
        }
        Ok(conn)
    }
}

/// Why [`RedisTarget::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis could not be reached, or refused the credentials or the certificate.
    #[error("{}", describe(.0))]
    Redis(#[from] RedisError),
}

enum Link {
    Direct(Box<ConnectionInfo>),
    Sentinel(Box<SentinelLink>),
}

/// A connection to a standalone Redis or to the current master of a Sentinel deployment. Cheap
/// to clone (clones share the connection). Use it as any `redis` async connection
/// (`query_async`, `invoke_async`, pipelines).
#[derive(Clone)]
pub enum RedisConnection {
    /// A fixed address: an auto-reconnecting connection manager.
    Direct(ConnectionManager),
    /// The master the sentinels name, re-resolved after a connection error or `READONLY`.
    Sentinel(Arc<SentinelLink>),
}

impl From<ConnectionManager> for RedisConnection {
    fn from(conn: ConnectionManager) -> Self {
        RedisConnection::Direct(conn)
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Direct(conn) => conn.req_packed_command(cmd),
            RedisConnection::Sentinel(link) => {
                let link = Arc::clone(link);
                Box::pin(async move {
                    let mut conn = link.master().await?;
                    let result =
                        tokio::time::timeout(link.timeouts.response, conn.req_packed_command(cmd))
                            .await
                            .map_err(|_| timeout_error())
                            .and_then(|r| r);
                    link.after(result.as_ref().map(std::slice::from_ref)).await;
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Sentinel(link) => {
                let link = Arc::clone(link);
                Box::pin(async move {
                    let mut conn = link.master().await?;
                    let result = tokio::time::timeout(
                        link.timeouts.response,
                        conn.req_packed_commands(pipeline, offset, count),
                    )
                    .await
                    .map_err(|_| timeout_error())
                    .and_then(|r| r);
                    link.after(result.as_deref()).await;
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Direct(conn) => conn.get_db(),
            RedisConnection::Sentinel(link) => link.db,
        }
    }
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// The sentinels of a deployment and the connection to the master they named last.
pub struct SentinelLink {
    sentinels: Vec<ConnectionInfo>,
    master: String,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// TLS for the master (the sentinels' scheme is `rediss://`).
    tls: Option<RedisTls>,
    tls_section: String,
    timeouts: ConnectTimeouts,
    current: tokio::sync::Mutex<Option<(String, MultiplexedConnection)>>,
}

impl std::fmt::Debug for SentinelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelLink")
            .field("master", &self.master)
            .field("sentinels", &self.sentinels.len())
            .finish_non_exhaustive()
    }
}

impl SentinelLink {
    /// The connection to the current master: the cached one, or a new one to the address the
    /// sentinels name now (its `ROLE` checked).
    async fn master(&self) -> RedisResult<MultiplexedConnection> {
        let mut current = self.current.lock().await;
        if let Some((_, conn)) = current.as_ref() {
            return Ok(conn.clone());
        }
        let (host, port) = self.resolve().await?;
        let addr = format!("{host}:{port}");
        let conn = self.connect_master(&host, port).await?;
        tracing::info!(master = %self.master, %addr, "Redis Sentinel: connected to the master");
        *current = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// After a request: forgets the connection when it failed in a way a failover explains (the
    /// connection broke, the node is a replica now), so the next request asks the sentinels.
    async fn after(&self, result: Result<&[Value], &RedisError>) {
        let stale = match result {
            Err(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || is_readonly(e)
            }
            Ok(values) => values.iter().any(|v| match v {
                Value::ServerError(e) => {
                    e.code() == "READONLY" || e.details().is_some_and(|d| d.contains("READONLY"))
                }
                _ => false,
            }),
        };
        if !stale {
            return;
        }
        let mut current = self.current.lock().await;
        if let Some((addr, _)) = current.take() {
            tracing::warn!(master = %self.master, %addr, "Redis Sentinel: the master connection failed or the node is read-only; asking the sentinels again on the next attempt");
        }
    }

    /// Asks each sentinel in turn for the master's address.
    async fn resolve(&self) -> RedisResult<(String, u16)> {
        let mut last: Option<RedisError> = None;
        for info in &self.sentinels {
            match self.ask(info).await {
                Ok(Some(addr)) => return Ok(addr),
                Ok(None) => {
                    last = Some(RedisError::from((
                        ErrorKind::MasterNameNotFoundBySentinel,
                        "the sentinel does not know the master",
                        self.master.clone(),
                    )));
                }
                Err(e) => {
                    if is_fatal(&e) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "no sentinel configured"))
        }))
    }

    async fn ask(&self, info: &ConnectionInfo) -> RedisResult<Option<(String, u16)>> {
        let client = redis::Client::open(info.clone())?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.response));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(reply)
    }

    async fn connect_master(&self, host: &str, port: u16) -> RedisResult<MultiplexedConnection> {
        let addr = match &self.tls {
            Some(_) => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let mut redis_info = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = &self.username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(password) = &self.password {
            redis_info = redis_info.set_password(password);
        }
        let info = format!("redis://{host}:{port}/")
            .into_connection_info()?
            .set_addr(addr)
            .set_redis_settings(redis_info);
        let info = apply_tls(
            info,
            self.tls.as_ref(),
            "sentinel master",
            &self.tls_section,
            "",
        )
        .map_err(|e| RedisError::from((ErrorKind::InvalidClientConfig, "TLS", e.to_string())))?;
        let client = redis::Client::open(info)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.response));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // The sentinels may still name a demoted master for a moment after a failover.
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role.first() {
            Some(Value::BulkString(r)) if r.as_slice() == b"master" => Ok(conn),
            other => Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the node the sentinels named is not a master (yet)",
                format!("{host}:{port} answered ROLE {other:?}"),
            ))),
        }
    }
}

fn is_readonly(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.code() == Some("READONLY")
        || e.to_string().contains("READONLY")
}

/// True for errors no retry can fix: refused credentials (`WRONGPASS`, `NOAUTH`, a failed
/// `AUTH`), a user without a permission (`NOPERM`), a server certificate that fails
/// verification (unknown CA, wrong host name, expired). A refused, reset or timed-out
/// connection, `LOADING`, `READONLY`, `MOVED`, … are not fatal.
pub fn is_fatal(e: &RedisError) -> bool {
    if e.kind() == ErrorKind::AuthenticationFailed
        || e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return true;
    }
    let text = e.to_string();
    // Inside a script an ACL refusal is a script error: "The user executing the script can't
    // run this command or subcommand".
    if [
        "WRONGPASS",
        "NOPERM",
        "NOAUTH",
        "executing the script can't run",
    ]
    .iter()
    .any(|code| text.contains(code))
    {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        let rustls_err = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            rustls_err,
            Some(
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(
                        rustls::AlertDescription::CertificateRequired
                            | rustls::AlertDescription::UnknownCA
                            | rustls::AlertDescription::BadCertificate
                    )
            )
        ) {
            return true;
        }
        source = err.source();
    }
    text.contains("invalid peer certificate")
}

/// The error with what to do about it, for logs and the final error of `run` / `invalidate`:
/// `<error>; fix: <hint>` for the fatal kinds ([`is_fatal`]), else the error alone. Never holds
/// a password (the `redis` crate does not put credentials in its errors).
pub fn describe(e: &RedisError) -> String {
    if !is_fatal(e) {
        return e.to_string();
    }
    let text = e.to_string();
    let hint = if text.contains("certificate") || text.contains("CA") {
        "the server's certificate was not accepted: set redis.tls.ca_file to the CA that signed \
         it (without it the Mozilla roots are used), connect by a host name the certificate \
         names (or set redis.tls.verify_hostname = false)"
    } else if text.contains("NOPERM")
        || text.contains("executing the script can't run")
        || e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
    {
        "the ACL user lacks a permission: cacheclear needs the scripting commands, the commands \
         its scripts call, SCAN, PING and INFO (CLUSTER for Redis Cluster) on the cache's keys, \
         e.g. ACL SETUSER cacheclear on >… ~* +@scripting +@read +@write +scan +ping +info +time \
         +cluster"
    } else {
        "Redis refused the credentials: check the user and password in the URL \
         (redis[s]://user:password@host:port/) or sentinel.username / sentinel.password"
    };
    format!("{text}; fix: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_table_needs_a_tls_url_and_readable_files() {
        let err = connection_info(
            "redis://u:secret@127.0.0.1:6379/",
            Some(&RedisTls::default()),
            "redis.url",
            "redis.tls",
        )
        .expect_err("redis:// with a tls table");
        assert!(
            err.to_string()
                .starts_with("redis.url: `redis://u:***@127.0.0.1:6379/` is not a TLS URL"),
            "{err}"
        );
        assert!(!err.to_string().contains("secret"));
        let err = connection_info(
            "rediss://127.0.0.1:6379/",
            Some(&RedisTls::with_ca_file("/nonexistent/ca.pem")),
            "redis.url",
            "redis.tls",
        )
        .expect_err("missing CA file");
        assert!(
            err.to_string()
                .starts_with("redis.tls.ca_file: cannot read `/nonexistent/ca.pem`"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("cacheclear-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "SECRET-KEY-MATERIAL not a certificate").expect("write");
        let err = connection_info(
            "rediss://127.0.0.1:6379/",
            Some(&RedisTls::with_ca_file(&junk)),
            "redis.url",
            "redis.tls",
        )
        .expect_err("junk CA file");
        let msg = err.to_string();
        assert!(msg.starts_with("redis.tls.ca_file: `"), "{msg}");
        assert!(msg.contains("holds no certificate"), "{msg}");
        assert!(!msg.contains("SECRET-KEY-MATERIAL"), "{msg}");
        let err = RedisTls {
            crt_file: Some(junk.clone()),
            ..RedisTls::default()
        }
        .certificates("redis.tls")
        .expect_err("crt without key");
        assert_eq!(err.field, "redis.tls.key_file");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cluster_seeds_share_credentials_and_scheme() {
        let seeds = |urls: &[&str]| urls.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        cluster_client_builder(
            &seeds(&["rediss://u:p@a:1/", "rediss://u:p@b:2/"]),
            None,
            "redis.urls",
            "redis.tls",
        )
        .expect("same credentials");
        let err = cluster_client_builder(
            &seeds(&["redis://u:p@a:1/", "redis://u:other@b:2/"]),
            None,
            "redis.urls",
            "redis.tls",
        )
        .expect_err("different passwords");
        assert!(
            err.to_string()
                .starts_with("redis.urls[1]: `redis://u:***@b:2/`"),
            "{err}"
        );
        let err = cluster_client_builder(
            &seeds(&["redis://a:1/", "rediss://b:2/"]),
            None,
            "redis.urls",
            "redis.tls",
        )
        .expect_err("mixed schemes");
        assert_eq!(err.field, "redis.urls[1]");
    }

    #[test]
    fn sentinel_targets_are_checked() {
        let debug = format!("{:?}", RedisTarget::url("redis://u:hunter2@h:1/"));
        assert!(!debug.contains("hunter2"), "{debug}");
        let target = RedisTarget::sentinel(RedisSentinel::new("", ["redis://s:26379/"]));
        assert_eq!(
            target.validate().expect_err("no master").field,
            "redis.sentinel.master"
        );
        let target = RedisTarget::sentinel(RedisSentinel::new("mymaster", Vec::<String>::new()));
        assert_eq!(
            target.validate().expect_err("no sentinels").field,
            "redis.sentinel.urls"
        );
        let mut target =
            RedisTarget::sentinel(RedisSentinel::new("mymaster", ["redis://s:26379/"]));
        target.validate().expect("valid");
        target.url = "redis://x:1/".into();
        assert_eq!(target.validate().expect_err("url too").field, "redis.url");
        let s = RedisSentinel::new("m", ["redis://:pw@s:1/"])
            .with_credentials(Some("app".into()), Some("hunter2".into()));
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("pw@"),
            "{debug}"
        );
    }

    #[test]
    fn fatal_errors_are_recognised() {
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert!(is_fatal(&auth));
        assert!(describe(&auth).contains("fix: Redis refused the credentials"));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_fatal(&refused));
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        ));
        assert!(!is_fatal(&readonly));
        assert!(is_readonly(&readonly));
        let cert = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(is_fatal(&cert), "{cert}");
        assert!(describe(&cert).contains("redis.tls.ca_file"));
    }
}

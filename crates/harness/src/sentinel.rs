//! Throwaway Redis Sentinel deployments: one master, one replica, and sentinels watching them.

use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::redis::{RedisInstance, RedisOptions};

/// The name the sentinels of a [`RedisSentinelSet`] monitor the master under.
pub const SENTINEL_MASTER: &str = "mymaster";

/// A private Sentinel deployment on 127.0.0.1: a master, a replica of it (`--replicaof`), and
/// `sentinels` Redis Sentinel processes (`redis-server sentinel.conf --sentinel`) monitoring it
/// as [`SENTINEL_MASTER`] with quorum 1, `down-after-milliseconds 1000` and `failover-timeout
/// 10000`. The data nodes take `opts` (TLS, password — the sentinels then use `auth-pass`);
/// the sentinels take the same TLS settings but no password.
///
/// [`RedisSentinelSet::start`] returns once the replica is in sync and every sentinel knows
/// the replica. Dropping it kills every process and deletes their directories. All methods
/// block.
#[derive(Debug)]
pub struct RedisSentinelSet {
    nodes: Vec<RedisInstance>,
    sentinels: Vec<RedisInstance>,
    timeout: Duration,
}

impl RedisSentinelSet {
    /// Starts the master, the replica and `sentinels` sentinels (1 or 3 are typical).
    ///
    /// # Errors
    /// As [`RedisInstance::start`]; [`HarnessError::ClusterNotReady`] when the replica does not
    /// sync or the sentinels do not see it within twice `opts.startup_timeout`.
    pub fn start(opts: RedisOptions, sentinels: usize) -> Result<RedisSentinelSet, HarnessError> {
        let timeout = opts.startup_timeout * 2;
        let master = RedisInstance::start_with(opts.clone())?;
        let replica = RedisInstance::start_with(opts.clone().args([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port().to_string(),
        ]))?;
        let mut set = RedisSentinelSet {
            nodes: vec![master, replica],
            sentinels: Vec::new(),
            timeout,
        };
        set.wait_until("the replica's sync with the master", |set| {
            let info = set.nodes[1].cli(&["INFO", "replication"])?;
            Ok(info
                .lines()
                .any(|l| l.trim() == "master_link_status:up")
                .then_some(())
                .ok_or(info))
        })?;
        let master_port = set.nodes[0].port();
        let mut conf = format!(
            "sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
        );
        if let Some(password) = &opts.password {
            conf.push_str(&format!(
                "sentinel auth-pass {SENTINEL_MASTER} {password}\n"
            ));
        }
        let sentinel_opts = RedisOptions {
            extra_args: Vec::new(),
            ..opts
        };
        for _ in 0..sentinels {
            set.sentinels
                .push(RedisInstance::start_sentinel(sentinel_opts.clone(), &conf)?);
        }
        set.wait_until("every sentinel seeing the replica", |set| {
            for sentinel in &set.sentinels {
                let replicas = sentinel.cli(&["SENTINEL", "REPLICAS", SENTINEL_MASTER])?;
                if !replicas.contains(&set.nodes[1].port().to_string()) {
                    return Ok(Err(format!(
                        "sentinel {} lists replicas: {}",
                        sentinel.port(),
                        replicas.replace('\n', " ")
                    )));
                }
            }
            Ok(Ok(()))
        })?;
        Ok(set)
    }

    /// URLs of the sentinels: `redis[s]://127.0.0.1:N/`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisInstance::url).collect()
    }

    /// The sentinels.
    pub fn sentinels(&self) -> &[RedisInstance] {
        &self.sentinels
    }

    /// The data nodes: the first master and its replica, in start order (roles change on
    /// failover: see [`RedisSentinelSet::master_port`]).
    pub fn nodes(&self) -> &[RedisInstance] {
        &self.nodes
    }

    /// The data node on `port`, mutably (to stop it: "the master dies").
    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisInstance> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// The master's port according to the first sentinel that answers
    /// (`SENTINEL GET-MASTER-ADDR-BY-NAME`).
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] when no sentinel answers with an address.
    pub fn master_port(&self) -> Result<u16, HarnessError> {
        let mut last = None;
        for sentinel in &self.sentinels {
            match sentinel.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER]) {
                Ok(reply) => {
                    if let Some(port) = reply.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                        return Ok(port);
                    }
                    last = Some(HarnessError::RedisCli {
                        port: sentinel.port(),
                        args: format!("SENTINEL GET-MASTER-ADDR-BY-NAME {SENTINEL_MASTER}"),
                        stderr: format!("unexpected reply: {reply}"),
                        hint: String::new(),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::RedisCli {
            port: 0,
            args: "SENTINEL GET-MASTER-ADDR-BY-NAME".into(),
            stderr: "no sentinel was started".into(),
            hint: String::new(),
        }))
    }

    /// `SENTINEL FAILOVER mymaster` on the first sentinel, then waits until the sentinels name
    /// the other data node and it answers `ROLE` as master (and the old master, when running,
    /// as a replica). Returns the new master's port.
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] when the sentinel refuses; [`HarnessError::ClusterNotReady`]
    /// when the promotion does not complete within the set's timeout.
    pub fn failover(&self) -> Result<u16, HarnessError> {
        let old = self.master_port()?;
        self.sentinels[0].cli(&["SENTINEL", "FAILOVER", SENTINEL_MASTER])?;
        self.wait_for_new_master(old)
    }

    /// Waits until the sentinels name a master other than `old` and it answers `ROLE` as master
    /// (after [`RedisSentinelSet::failover`], or after the master was stopped). Returns its port.
    ///
    /// # Errors
    /// [`HarnessError::ClusterNotReady`] when that does not happen within the set's timeout.
    pub fn wait_for_new_master(&self, old: u16) -> Result<u16, HarnessError> {
        let mut promoted = 0;
        self.wait_until("the failover to the replica", |set| {
            let port = set.master_port()?;
            if port == old {
                return Ok(Err(format!("the sentinels still name port {old}")));
            }
            let node = set.nodes.iter().find(|n| n.port() == port);
            let role = match node {
                Some(node) => node.cli(&["ROLE"])?,
                None => return Ok(Err(format!("the sentinels name unknown port {port}"))),
            };
            if role.lines().next().map(str::trim) != Some("master") {
                return Ok(Err(format!("port {port} answers ROLE {role}")));
            }
            if let Some(old_node) = set.nodes.iter().find(|n| n.port() == old)
                && old_node.pid().is_some()
            {
                let old_role = old_node.cli(&["ROLE"])?;
                if old_role.lines().next().map(str::trim) != Some("slave") {
                    return Ok(Err(format!("old master {old} answers ROLE {old_role}")));
                }
            }
            promoted = port;
            Ok(Ok(()))
        })?;
        Ok(promoted)
    }

    /// Polls `check` (20 ms doubling to 200 ms) until it says `Ok(Ok(()))`, for at most the
    /// set's timeout; `Ok(Err(detail))` and errors are the last observation of the timeout error.
    fn wait_until(
        &self,
        what: &str,
        mut check: impl FnMut(&Self) -> Result<Result<(), String>, HarnessError>,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let detail = match check(self) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(detail)) => detail,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let ports = self
                    .nodes
                    .iter()
                    .chain(&self.sentinels)
                    .map(|n| n.port().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let log_tail = self
                    .nodes
                    .iter()
                    .chain(&self.sentinels)
                    .map(|n| format!("--- port {}\n{}", n.port(), n.log_tail(8)))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(HarnessError::ClusterNotReady {
                    ports,
                    what: format!("Redis Sentinel: {what}"),
                    timeout: self.timeout,
                    detail,
                    log_tail,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

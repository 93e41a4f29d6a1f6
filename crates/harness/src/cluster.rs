//! Throwaway Redis Clusters: several cluster-enabled [`RedisInstance`]s joined into one cluster.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::process::{
    self, describe, kill_on_parent_exit, spawn_error, spawn_tied_to_process, status_text,
};
use crate::redis::{RedisInstance, RedisOptions};

/// Number of hash slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

const HOST: &str = "127.0.0.1";
const LOG_TAIL_LINES: usize = 8;

/// A private Redis Cluster on 127.0.0.1: `masters × (1 + replicas_per_master)` cluster-enabled
/// `redis-server` processes, each a [`RedisInstance`] (own free port, own cluster bus port, own
/// temp dir with its `nodes.conf`, no persistence, `--cluster-node-timeout 2000`), joined with
/// `redis-cli --cluster create` (3 or more masters) or `CLUSTER ADDSLOTSRANGE`/`MEET`/`REPLICATE`
/// (1 or 2 masters, which `redis-cli` refuses).
///
/// [`RedisCluster::start`] returns once every node reports `cluster_state:ok` with all 16384
/// slots assigned and every replica is in sync with its master.
///
/// Lifetime: as for [`RedisInstance`]: dropping the cluster kills every node and deletes its
/// directory; if this process dies without running `Drop`, Linux kills the nodes too.
///
/// Roles change (see [`RedisCluster::failover`]), so [`RedisCluster::masters`] and
/// [`RedisCluster::replicas`] ask the nodes each time. All methods block; from async code call
/// them in `spawn_blocking` or before the runtime work.
///
/// ```no_run
/// use cacheclear_harness::RedisCluster;
/// # fn main() -> Result<(), cacheclear_harness::HarnessError> {
/// let cluster = RedisCluster::start(3, 1)?; // 6 nodes, ~2-5 s
/// assert_eq!(cluster.masters()?.len(), 3);
/// let seeds: Vec<String> = cluster.seeds(); // redis://127.0.0.1:N/ of every node
/// let replica = cluster.replicas()?[0];
/// cluster.failover(replica)?; // the replica is a master now
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisInstance>,
    masters: usize,
    replicas_per_master: usize,
    timeout: Duration,
}

impl RedisCluster {
    /// Starts `masters × (1 + replicas_per_master)` nodes, creates the cluster (slots spread
    /// evenly over the masters, `replicas_per_master` replicas each) and waits until it is
    /// usable. Takes a few seconds.
    ///
    /// # Errors
    /// [`HarnessError::ClusterNotReady`] for `masters == 0` or a cluster that does not become
    /// healthy within 60 s; [`HarnessError::CommandFailed`] if `redis-cli --cluster create`
    /// fails (with its output); [`HarnessError::BinaryNotFound`] if `redis-server` or
    /// `redis-cli` is missing; otherwise as [`RedisInstance::start`].
    pub fn start(masters: usize, replicas_per_master: usize) -> Result<RedisCluster, HarnessError> {
        Self::start_with(masters, replicas_per_master, RedisOptions::default())
    }

    /// Like [`RedisCluster::start`], with the options of every node (TLS with `tls-cluster yes`
    /// and `tls-replication yes`, `requirepass` + `masterauth`) and extra `redis-server` arguments (they
    /// come after the harness's own, so they win) and `opts.startup_timeout` as the bound of
    /// each node's start *and* of the cluster's formation (default 30 s each; the cluster-wide
    /// waits use twice that).
    ///
    /// # Errors
    /// As [`RedisCluster::start`].
    pub fn start_with(
        masters: usize,
        replicas_per_master: usize,
        opts: RedisOptions,
    ) -> Result<RedisCluster, HarnessError> {
        let timeout = opts.startup_timeout * 2;
        if masters == 0 || masters > usize::from(CLUSTER_SLOTS) {
            return Err(HarnessError::ClusterNotReady {
                ports: String::new(),
                what: "creating the cluster".into(),
                timeout: Duration::ZERO,
                detail: format!(
                    "a cluster needs between 1 and {CLUSTER_SLOTS} masters, {masters} were asked for"
                ),
                log_tail: String::new(),
            });
        }
        let opts = RedisOptions {
            extra_args: ["--cluster-node-timeout", "2000"]
                .into_iter()
                .map(String::from)
                .chain(opts.extra_args)
                .collect(),
            ..opts
        };
        let total = masters * (1 + replicas_per_master);
        let mut nodes = Vec::with_capacity(total);
        for _ in 0..total {
            nodes.push(RedisInstance::start_cluster_node(opts.clone())?);
        }
        let cluster = RedisCluster {
            nodes,
            masters,
            replicas_per_master,
            timeout,
        };
        if masters >= 3 {
            cluster.create_with_redis_cli()?;
        } else {
            cluster.create_by_hand()?;
        }
        cluster.wait_ready(timeout, true)?;
        Ok(cluster)
    }

    /// Seed URLs for a cluster client, one per node (masters and replicas, creation order):
    /// `redis://127.0.0.1:N/` (`rediss://` for a TLS cluster; no credentials). Any one reachable node is enough for a client to find the rest.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisInstance::url).collect()
    }

    /// Every node, in creation order (ports, pids, logs; the roles are not fixed: see
    /// [`RedisCluster::masters`]).
    pub fn nodes(&self) -> &[RedisInstance] {
        &self.nodes
    }

    /// The client ports of every node, in creation order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisInstance::port).collect()
    }

    /// The node listening on `port`, if it belongs to this cluster.
    pub fn node(&self, port: u16) -> Option<&RedisInstance> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    /// The node listening on `port`, mutably: to [`RedisInstance::stop`] it ("a node dies") and
    /// [`RedisInstance::start_again`] it (it rejoins with its identity, its data set empty).
    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisInstance> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// Number of masters the cluster was created with.
    pub fn master_count(&self) -> usize {
        self.masters
    }

    /// Number of replicas per master the cluster was created with.
    pub fn replicas_per_master(&self) -> usize {
        self.replicas_per_master
    }

    /// Ports of the running nodes whose `ROLE` is `master` right now, ascending.
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] if a running node does not answer.
    pub fn masters(&self) -> Result<Vec<u16>, HarnessError> {
        self.ports_with_role("master")
    }

    /// Ports of the running nodes whose `ROLE` is `slave` (replica) right now, ascending.
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] if a running node does not answer.
    pub fn replicas(&self) -> Result<Vec<u16>, HarnessError> {
        self.ports_with_role("slave")
    }

    /// The port of the master that the replica on `replica_port` replicates (from its `ROLE`).
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] if the node does not answer, is not part of the cluster, or is
    /// not a replica.
    pub fn master_of(&self, replica_port: u16) -> Result<u16, HarnessError> {
        let role = self.cli(replica_port, &["ROLE"])?;
        let mut lines = role.lines().map(str::trim);
        let not_replica = |detail: String| HarnessError::RedisCli {
            port: replica_port,
            args: "ROLE".into(),
            stderr: detail,
            hint: " (ask a replica: see RedisCluster::replicas)".into(),
        };
        if lines.next() != Some("slave") {
            return Err(not_replica(format!("the node is not a replica: {role}")));
        }
        let _host = lines.next();
        lines
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| not_replica(format!("unexpected ROLE reply: {role}")))
    }

    /// Runs `redis-cli -e -h 127.0.0.1 -p <port> <args...>` against one node (no `-c`: a key
    /// of another node's slot gets a `MOVED` error) and returns its stdout without the trailing
    /// newline, as [`RedisInstance::cli`].
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] for an error reply, an unreachable node, or a port that is not
    /// one of this cluster's nodes.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, HarnessError> {
        match self.node(port) {
            Some(node) => node.cli(args),
            None => Err(HarnessError::RedisCli {
                port,
                args: args.join(" "),
                stderr: format!(
                    "no node of this cluster listens on port {port} (its nodes: {})",
                    self.ports_text()
                ),
                hint: String::new(),
            }),
        }
    }

    /// A manual failover: runs `CLUSTER FAILOVER` on the replica at `replica_port`, which then
    /// takes over its master's slots in coordination with it (no writes lost), and waits until
    /// the replica reports role `master` and every running node reports `cluster_state:ok` with
    /// all slots served. The old master becomes a replica of it.
    ///
    /// # Errors
    /// [`HarnessError::RedisCli`] if the node is not a replica or refuses (e.g. its master is
    /// down: use `CLUSTER FAILOVER FORCE` through [`RedisCluster::cli`] then);
    /// [`HarnessError::ClusterNotReady`] if the promotion does not complete within the
    /// cluster's timeout (twice the startup timeout, 60 s by default).
    pub fn failover(&self, replica_port: u16) -> Result<(), HarnessError> {
        // Refuses early, with a clear message, when the node is not a replica.
        let old_master = self.master_of(replica_port)?;
        self.cli(replica_port, &["CLUSTER", "FAILOVER"])?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(10);
        let role_of = |port: u16| {
            self.cli(port, &["ROLE"])
                .ok()
                .and_then(|r| r.lines().next().map(|l| l.trim().to_owned()))
        };
        loop {
            let role = self.cli(replica_port, &["ROLE"]);
            // Done when the replica is master AND the old master has learned it was demoted
            // (it does so asynchronously, from the new master's gossip).
            let promoted =
                matches!(&role, Ok(r) if r.lines().next().map(str::trim) == Some("master"));
            if promoted && role_of(old_master).as_deref() == Some("slave") {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(
                    format!("the failover to the replica on port {replica_port}"),
                    self.timeout,
                    match role {
                        Ok(r) => format!("its ROLE still says: {}", r.replace('\n', " ")),
                        Err(e) => e.to_string(),
                    },
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        self.wait_ready(self.timeout, false)
    }

    /// Waits up to `timeout` until every running node reports `cluster_state:ok` with all
    /// 16384 slots assigned and served (`cluster_slots_ok`) and knows every node, e.g. after
    /// stopping or restarting a node.
    ///
    /// # Errors
    /// [`HarnessError::ClusterNotReady`] naming the node and what it reported last.
    pub fn wait_ok(&self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_ready(timeout, false)
    }

    fn ports_with_role(&self, role: &str) -> Result<Vec<u16>, HarnessError> {
        let mut ports = Vec::new();
        for node in &self.nodes {
            if node.pid().is_none() {
                continue;
            }
            let reply = node.cli(&["ROLE"])?;
            if reply.lines().next().map(str::trim) == Some(role) {
                ports.push(node.port());
            }
        }
        ports.sort_unstable();
        Ok(ports)
    }

    fn create_with_redis_cli(&self) -> Result<(), HarnessError> {
        let first = &self.nodes[0];
        let cli = first.binaries().require_cli()?;
        let out_path = first.dir().join("cluster-create.log");
        let open = || {
            File::create(&out_path).map_err(|e| {
                HarnessError::io(format!("could not create {}", out_path.display()), e)
            })
        };
        let out = open()?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io(format!("could not open {}", out_path.display()), e))?;
        let mut cmd = Command::new(cli);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        first.cli_connection_args(&mut cmd);
        cmd.args(["--cluster", "create"])
            .args(self.nodes.iter().map(|n| format!("{HOST}:{}", n.port())))
            .args(["--cluster-replicas", &self.replicas_per_master.to_string()])
            .arg("--cluster-yes");
        kill_on_parent_exit(&mut cmd, libc::SIGKILL);
        let command = describe(&cmd);
        let mut child = spawn_tied_to_process(cmd).map_err(|e| spawn_error(cli, e, None))?;
        let status = match process::wait_timeout(&mut child, self.timeout) {
            Ok(Some(status)) => Some(status),
            Ok(None) | Err(_) => {
                let _ = process::terminate(&mut child, libc::SIGKILL, Duration::ZERO);
                None
            }
        };
        let output = process::tail(&out_path, 0, 30);
        match status {
            // redis-cli prints "[ERR] ..." but may still exit 0 on some failures.
            Some(s) if s.success() && !output.contains("[ERR]") => Ok(()),
            status => Err(HarnessError::CommandFailed {
                command,
                status: match status {
                    Some(s) => status_text(Some(s)),
                    None => format!("still running after {:?}, killed", self.timeout),
                },
                output,
                hint: "check that redis-cli matches the redis-server version (7.0 or later is \
                       needed for the separate cluster bus ports) and the node logs"
                    .into(),
            }),
        }
    }

    /// `CLUSTER ADDSLOTSRANGE` / `MEET` / `REPLICATE` by hand, for 1 or 2 masters.
    fn create_by_hand(&self) -> Result<(), HarnessError> {
        let (masters, replicas) = self.nodes.split_at(self.masters);
        let per = usize::from(CLUSTER_SLOTS).div_ceil(self.masters);
        for (i, node) in masters.iter().enumerate() {
            let start = i * per;
            let end = ((i + 1) * per).min(usize::from(CLUSTER_SLOTS)) - 1;
            node.cli(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &start.to_string(),
                &end.to_string(),
            ])?;
        }
        let first = &self.nodes[0];
        let first_port = first.port().to_string();
        let first_bus = first.cluster_bus_port().unwrap_or(0).to_string();
        for node in &self.nodes[1..] {
            node.cli(&["CLUSTER", "MEET", HOST, &first_port, &first_bus])?;
        }
        self.wait_until(
            "every node to know every other node",
            self.timeout,
            |node| {
                let info = node.cli(&["CLUSTER", "INFO"])?;
                let known = info_field(&info, "cluster_known_nodes");
                Ok((known == Some(self.nodes.len().to_string().as_str()))
                    .then_some(())
                    .ok_or_else(|| format!("cluster_known_nodes:{}", known.unwrap_or("?"))))
            },
        )?;
        let ids = masters
            .iter()
            .map(|m| m.cli(&["CLUSTER", "MYID"]))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, replica) in replicas.iter().enumerate() {
            let id = ids[i % self.masters].trim();
            replica.cli(&["CLUSTER", "REPLICATE", id])?;
        }
        Ok(())
    }

    /// Waits until every running node is healthy; with `replicas_synced`, also until every
    /// replica's link to its master is up.
    fn wait_ready(&self, timeout: Duration, replicas_synced: bool) -> Result<(), HarnessError> {
        let total = self.nodes.len().to_string();
        let slots = CLUSTER_SLOTS.to_string();
        self.wait_until(
            "cluster_state:ok with all 16384 slots served, on every node",
            timeout,
            |node| {
                let info = node.cli(&["CLUSTER", "INFO"])?;
                for (field, want) in [
                    ("cluster_state", "ok"),
                    ("cluster_slots_assigned", slots.as_str()),
                    ("cluster_slots_ok", slots.as_str()),
                    ("cluster_known_nodes", total.as_str()),
                ] {
                    let got = info_field(&info, field);
                    if got != Some(want) {
                        return Ok(Err(format!("{field}:{}", got.unwrap_or("(missing)"))));
                    }
                }
                Ok(Ok(()))
            },
        )?;
        if replicas_synced {
            let expected = self.masters * self.replicas_per_master;
            let replicas = self.replicas()?;
            if replicas.len() != expected {
                return Err(self.not_ready(
                    format!("{expected} replicas"),
                    timeout,
                    format!("the nodes on ports {replicas:?} report role slave"),
                ));
            }
            self.wait_until("every replica to sync with its master", timeout, |node| {
                let role = node.cli(&["ROLE"])?;
                let mut lines = role.lines().map(str::trim);
                if lines.next() != Some("slave") {
                    return Ok(Ok(()));
                }
                match lines.nth(2) {
                    Some("connected") => Ok(Ok(())),
                    state => Ok(Err(format!(
                        "replication state {}",
                        state.unwrap_or("(missing)")
                    ))),
                }
            })?;
        }
        Ok(())
    }

    /// Polls `check` on every running node until it returns `Ok(Ok(()))` for all of them, or
    /// `timeout` passes. `Ok(Err(detail))` and `Err` mean "not yet".
    fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&RedisInstance) -> Result<Result<(), String>, HarnessError>,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let mut failing = None;
            for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
                let detail = match check(node) {
                    Ok(Ok(())) => continue,
                    Ok(Err(detail)) => detail,
                    Err(e) => e.to_string(),
                };
                failing = Some(format!("node on port {}: {detail}", node.port()));
                break;
            }
            let Some(detail) = failing else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(self.not_ready(what.into(), timeout, detail));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn not_ready(&self, what: String, timeout: Duration, detail: String) -> HarnessError {
        let log_tail = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "--- port {} ({}) ---\n{}",
                    n.port(),
                    n.log_path().display(),
                    n.log_tail(LOG_TAIL_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        HarnessError::ClusterNotReady {
            ports: self.ports_text(),
            what,
            timeout,
            detail,
            log_tail,
        }
    }

    fn ports_text(&self) -> String {
        self.ports()
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The value of `field` in an `INFO`-style reply (`field:value` lines).
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_found_exactly() {
        let info = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n";
        assert_eq!(info_field(info, "cluster_state"), Some("ok"));
        assert_eq!(info_field(info, "cluster_slots_ok"), Some("16384"));
        assert_eq!(info_field(info, "cluster_slots"), None);
        assert_eq!(info_field(info, "cluster_size"), None);
    }
}

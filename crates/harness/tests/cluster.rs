//! Integration tests of `RedisCluster`: real cluster-enabled `redis-server`s.

use std::time::Duration;

use cacheclear_harness::{CLUSTER_SLOTS, HarnessError, RedisCluster};
use redis::TypedCommands;

fn client(cluster: &RedisCluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.seeds())
        .expect("cluster client")
        .get_connection()
        .expect("connect to the cluster")
}

/// The `CLUSTER INFO` field `field` of the node on `port`.
fn info(cluster: &RedisCluster, port: u16, field: &str) -> String {
    let info = cluster
        .cli(port, &["CLUSTER", "INFO"])
        .expect("CLUSTER INFO");
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
        .trim()
        .to_string()
}

#[test]
fn three_masters_with_a_replica_each_serve_every_slot() {
    let cluster = RedisCluster::start(3, 1).expect("start the cluster");
    assert_eq!(cluster.nodes().len(), 6);
    assert_eq!(cluster.seeds().len(), 6);
    let masters = cluster.masters().expect("masters");
    let replicas = cluster.replicas().expect("replicas");
    assert_eq!(masters.len(), 3, "masters {masters:?}");
    assert_eq!(replicas.len(), 3, "replicas {replicas:?}");
    for port in cluster.ports() {
        assert_ne!(port, 6379);
        assert_eq!(info(&cluster, port, "cluster_state"), "ok");
        assert_eq!(
            info(&cluster, port, "cluster_slots_assigned"),
            CLUSTER_SLOTS.to_string()
        );
        assert_eq!(info(&cluster, port, "cluster_known_nodes"), "6");
        let node = cluster.node(port).expect("node");
        let bus = node
            .cluster_bus_port()
            .expect("a cluster node has a bus port");
        assert_ne!(bus, port);
    }
    // Every master has its own replica.
    let mut replicated: Vec<u16> = replicas
        .iter()
        .map(|&r| cluster.master_of(r).expect("master_of"))
        .collect();
    replicated.sort_unstable();
    assert_eq!(replicated, masters);

    // Keys written through a cluster client land on the node that owns their slot and read back.
    let mut conn = client(&cluster);
    for i in 0..200 {
        conn.set(format!("key:{i}"), i)
            .expect("SET through the cluster");
    }
    for i in 0..200 {
        let v: Option<String> = conn.get(format!("key:{i}")).expect("GET");
        assert_eq!(v, Some(i.to_string()));
    }
    let mut per_master = Vec::new();
    for &m in &masters {
        let n: usize = cluster
            .cli(m, &["DBSIZE"])
            .expect("DBSIZE")
            .parse()
            .expect("n");
        assert!(n > 0, "master {m} holds no key: slots are not spread");
        per_master.push(n);
    }
    assert_eq!(per_master.iter().sum::<usize>(), 200);

    // redis-cli without -c: another node's key is a MOVED error, reported with the command.
    let foreign = masters
        .iter()
        .copied()
        .find(|&m| cluster.cli(m, &["GET", "key:0"]).is_err())
        .expect("some master does not own key:0");
    let err = cluster.cli(foreign, &["GET", "key:0"]).expect_err("MOVED");
    assert!(err.to_string().contains("MOVED"), "{err}");
    // A port that is not a node of the cluster.
    let err = cluster.cli(1, &["PING"]).expect_err("not a node");
    assert!(err.to_string().contains("no node of this cluster"), "{err}");
    assert!(matches!(err, HarnessError::RedisCli { .. }));
}

#[test]
fn failover_promotes_the_replica_and_keeps_the_data() {
    let cluster = RedisCluster::start(3, 1).expect("start the cluster");
    let mut conn = client(&cluster);
    for i in 0..100 {
        conn.set(format!("k{i}"), i).expect("SET");
    }
    let replica = cluster.replicas().expect("replicas")[0];
    let old_master = cluster.master_of(replica).expect("master_of");
    cluster.failover(replica).expect("failover");
    let masters = cluster.masters().expect("masters");
    assert!(masters.contains(&replica), "{replica} not in {masters:?}");
    assert!(
        !masters.contains(&old_master),
        "{old_master} still in {masters:?}"
    );
    assert_eq!(cluster.master_of(old_master).expect("demoted"), replica);
    // A failover of a master is refused with a clear error.
    let err = cluster.failover(masters[0]).expect_err("not a replica");
    assert!(err.to_string().contains("not a replica"), "{err}");
    // The client follows the new topology (MOVED → refresh); nothing was lost.
    let mut conn = client(&cluster);
    for i in 0..100 {
        let v: Option<String> = conn.get(format!("k{i}")).expect("GET after failover");
        assert_eq!(v, Some(i.to_string()));
    }
}

#[test]
fn one_master_clusters_are_created_by_hand_and_a_killed_node_is_restarted() {
    let mut cluster = RedisCluster::start(1, 1).expect("start a one-master cluster");
    let masters = cluster.masters().expect("masters");
    assert_eq!(masters.len(), 1);
    assert_eq!(cluster.replicas().expect("replicas").len(), 1);
    let mut conn = client(&cluster);
    conn.set("a", "1").expect("SET");
    assert_eq!(conn.get("a").expect("GET"), Some("1".to_string()));
    // The replica dies and comes back: the cluster stays ok and the node rejoins.
    let replica = cluster.replicas().expect("replicas")[0];
    let node = cluster.node_mut(replica).expect("node");
    node.stop().expect("stop");
    assert!(cluster.cli(replica, &["PING"]).is_err());
    cluster
        .node_mut(replica)
        .expect("node")
        .start_again()
        .expect("start again");
    cluster.wait_ok(Duration::from_secs(30)).expect("ok again");
    assert_eq!(cluster.master_of(replica).expect("rejoined"), masters[0]);
}

#[test]
fn zero_masters_is_refused() {
    let err = RedisCluster::start(0, 1).expect_err("no masters");
    assert!(
        err.to_string().contains("between 1 and 16384 masters"),
        "{err}"
    );
}

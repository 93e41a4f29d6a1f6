//! Kafka over SASL_SSL: librdkafka is built with SSL and SASL PLAIN/SCRAM (`builtin.features`),
//! and the clients `cacheclear run` (Kafka sink) and `cacheclear invalidate` (consumer, and the
//! dead-letter producer) build from a config whose `[kafka.properties]` set `security.protocol =
//! SASL_SSL`, `sasl.mechanisms = SCRAM-SHA-512`, `sasl.username`, `sasl.password` and
//! `ssl.ca.location` are created, with those settings in force. No broker is contacted: tansu
//! 0.6.0, the only Kafka-API broker here, serves neither TLS (its `--cert` and `--key` flags
//! refuse each other) nor SCRAM users with memory storage (`tansu user create` is itself refused
//! once `--authentication` is on), so the handshake with a broker is not tested here.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::BaseProducer;

/// A PEM CA certificate in a temp dir (librdkafka loads `ssl.ca.location` when a client is
/// created).
fn ca_file(dir: &std::path::Path) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).expect("CA");
    let path = dir.join("msk-ca.pem");
    std::fs::write(&path, ca.pem()).expect("write CA");
    path.display().to_string()
}

fn security_properties(ca: &str) -> String {
    format!(
        r#"[kafka.properties]
"security.protocol" = "SASL_SSL"
"ssl.ca.location" = "{ca}"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "cacheclear"
"sasl.password" = "S3cr3t-kafka"
"#
    )
}

/// The value librdkafka holds for `key` in a configuration.
fn native(cfg: &ClientConfig, key: &str) -> String {
    cfg.create_native_config()
        .expect("librdkafka accepts the configuration")
        .get(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[test]
fn librdkafka_is_built_with_ssl_and_sasl_plain_and_scram() {
    let features = native(&ClientConfig::new(), "builtin.features");
    let features: Vec<&str> = features.split(',').collect();
    for wanted in ["ssl", "sasl_plain", "sasl_scram"] {
        assert!(
            features.contains(&wanted),
            "`{wanted}` missing from builtin.features {features:?}"
        );
    }
}

#[test]
fn sink_and_invalidator_clients_are_created_for_sasl_ssl_scram() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_file(dir.path());

    // `cacheclear run`'s `[kafka]` (the sink), as the config file gives it.
    #[derive(serde::Deserialize)]
    struct SinkFile {
        kafka: cacheclear_sink_kafka::KafkaConfig,
    }
    let text = format!(
        "[kafka]\nbrokers = \"b-1.msk.example.com:9096\"\ntopic = \"cacheclear.invalidations\"\n{}",
        security_properties(&ca)
    );
    let sink: SinkFile = toml::from_str(&text).expect("sink [kafka] parses");
    sink.kafka
        .validate()
        .expect("security properties are allowed");
    let props: BTreeMap<String, String> = sink.kafka.producer_properties();
    assert_eq!(props["security.protocol"], "SASL_SSL");
    assert_eq!(props["sasl.mechanisms"], "SCRAM-SHA-512");
    let mut producer = ClientConfig::new();
    for (k, v) in &props {
        producer.set(k, v);
    }
    assert_eq!(native(&producer, "security.protocol"), "sasl_ssl");
    assert_eq!(native(&producer, "sasl.mechanisms"), "SCRAM-SHA-512");
    assert_eq!(native(&producer, "sasl.username"), "cacheclear");
    let created = cacheclear_sink_kafka::KafkaSink::connect(sink.kafka.clone());
    assert!(
        created.is_ok(),
        "the Kafka sink's producer is created: {:?}",
        created.err().map(|e| e.to_string())
    );

    // `cacheclear invalidate`'s `[kafka]`: the consumer and the dead-letter producer.
    #[derive(serde::Deserialize)]
    struct InvalidatorFile {
        kafka: cacheclear_invalidator::KafkaConfig,
    }
    let text = format!(
        "[kafka]\nbrokers = \"b-1.msk.example.com:9096\"\ngroup_id = \"cacheclear-eu\"\n\
         topics = [\"cacheclear.invalidations\"]\ndead_letter_topic = \"cacheclear.dlq\"\n\
         instance_id = \"host-1\"\n{}",
        security_properties(&ca)
    );
    let inv: InvalidatorFile = toml::from_str(&text).expect("invalidator [kafka] parses");
    inv.kafka
        .validate()
        .expect("security properties are allowed");
    let consumer_cfg = cacheclear_invalidator::consumer_config(&inv.kafka);
    assert_eq!(native(&consumer_cfg, "security.protocol"), "sasl_ssl");
    assert_eq!(native(&consumer_cfg, "sasl.mechanisms"), "SCRAM-SHA-512");
    assert_eq!(native(&consumer_cfg, "group.instance.id"), "host-1");
    consumer_cfg
        .create::<BaseConsumer>()
        .expect("the invalidator's consumer is created for SASL_SSL + SCRAM-SHA-512");
    let dlq_cfg = cacheclear_invalidator::dead_letter_producer_config(&inv.kafka);
    assert_eq!(native(&dlq_cfg, "security.protocol"), "sasl_ssl");
    assert_eq!(native(&dlq_cfg, "sasl.username"), "cacheclear");
    dlq_cfg
        .create::<BaseProducer>()
        .expect("the dead-letter producer is created for SASL_SSL + SCRAM-SHA-512");

    // A CA file that does not exist is refused when the client is created, naming the property.
    let mut missing = inv.kafka.clone();
    missing.properties.insert(
        "ssl.ca.location".into(),
        dir.path().join("nope.pem").display().to_string(),
    );
    let err = cacheclear_invalidator::consumer_config(&missing)
        .create::<BaseConsumer>()
        .err()
        .expect("a missing CA file is refused")
        .to_string();
    assert!(err.contains("ssl.ca.location"), "{err}");
}

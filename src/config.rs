//! The broker's one typed configuration: TOML file < environment (`SLUICE_*`) < flags.
//!
//! Every field can be set in the file, and as an environment variable named `SLUICE_` plus the
//! field's path in upper case with `_` between section and key: `listen` is `SLUICE_LISTEN`,
//! `log.fsync` is `SLUICE_LOG_FSYNC`. An environment value is read as a TOML value when it parses
//! as one (`SLUICE_LOG_SEGMENT_BYTES=1048576`) and as a string otherwise (`SLUICE_LOG_FSYNC=never`).
//! `sluice.toml` at the repository root is a fully commented example.
//!
//! Over 450 lines with one job: every setting with its default, its names (file, environment,
//! flag) and its check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::{AuthConfig, Policy, TlsConfig};
use crate::replication::config::ClusterConfig;
use crate::storage::LogConfig;

/// Errors in loading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[http]`: the HTTP port beside gRPC (see docs/operations.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`, `/api/v1/` and the console at `/`; empty
    /// turns the port off. Plaintext only: beyond loopback it needs `allow_plaintext`.
    /// Default: `127.0.0.1:7071`.
    pub listen: String,
    /// Connections open at once at most; one more is closed at once. Default: 64.
    pub max_connections: usize,
    /// A request's line and headers must arrive within this, in ms, or the connection is
    /// closed; a kept-alive connection waiting for its next request too. Default: 10000.
    pub header_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:7071".into(),
            max_connections: 64,
            header_timeout_ms: 10_000,
        }
    }
}

impl HttpConfig {
    /// The address to listen on, `None` when the port is off.
    pub fn addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "http.listen = {listen:?}: expected an address such as 127.0.0.1:7071, or \"\" \
                 to turn the HTTP port off"
            ))
        })
    }
}

/// Everything `sluice serve` can be told. Each field says its default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where topics, groups and the lock live. Default: `./data`.
    pub data_dir: PathBuf,
    /// Address the gRPC server listens on. Default: `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Create a topic (with `default_partitions`) on its first Send. Default: true.
    pub auto_create_topics: bool,
    /// Partitions of auto-created topics and of topics created without a count. Default: 1.
    pub default_partitions: u32,
    /// Largest message (key + value + headers) accepted. Default: 1048576 (1 MiB).
    pub max_message_bytes: usize,
    /// Most messages in one Send. Default: 10000.
    pub max_batch_messages: usize,
    /// Largest Send request on the wire. Default: 16777216 (16 MiB).
    pub max_request_bytes: usize,
    /// Most client connections at once. At the limit a new connection replaces the one with no
    /// call open for longest; when every connection has a call open, it waits. Default: 1024.
    pub max_connections: usize,
    /// Most concurrent streams (calls) per connection. Default: 1024.
    pub max_concurrent_streams: u32,
    /// A connection that has not sent the HTTP/2 preface and its first frame within this many
    /// ms is closed, so that silent connections cannot hold the `max_connections` slots.
    /// Default: 5000.
    pub handshake_timeout_ms: u64,
    /// A connection with no call open for this many ms is closed (GOAWAY; clients reconnect on
    /// their next call). Default: 300000 (5 min).
    pub idle_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish before their connections
    /// are dropped; the clean close of every partition runs either way. Default: 10000.
    pub shutdown_timeout_ms: u64,
    /// Responses buffered per subscription before its readers pause. Default: 8.
    pub subscriber_buffer: usize,
    /// Log bytes read per streamed response: whole batches, so a response may exceed it by
    /// one batch. Default: 262144 (256 KiB; measured faster than 64 KiB or 1 MiB on loopback).
    pub delivery_batch_bytes: usize,
    /// Apply retention (topics' `retention_ms`, `retention_bytes`, `retain_until_consumed`) every
    /// this many ms; 0 turns the periodic run off (`sluice compact` still works). Default: 300000.
    pub retention_check_ms: u64,
    /// While a partition's writer serves a lone producer (see `log.writer_spin_us`) and its
    /// syncs take no longer than this, the Send waiting for that producer's acknowledgement
    /// polls for it for up to this many microseconds instead of sleeping, so the answer leaves
    /// without a thread wake-up. At most one Send in the broker polls at a time. 0 turns it
    /// off. Default: 500.
    pub send_spin_us: u64,
    /// A Send to one partition that arrives while the writer pool has nothing to do is written
    /// and synced on the worker thread that received it, when that partition's last sync took
    /// no longer than this many microseconds: a lone producer's acknowledgement then needs no
    /// hand-off between threads. At most one worker thread at a time is held this way, and
    /// only when the runtime has two or more. 0 turns it off. Default: 2000.
    pub send_inline_sync_us: u64,
    /// Threads of the writer pool that runs group commit for every partition and group log
    /// (see docs/storage.md); 0 means one per core. Default: 0.
    pub writer_threads: usize,
    /// Log output: `text` or `json`. Default: `text`.
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (`RUST_LOG` wins when set). Default: `info`.
    pub log_filter: String,
    /// Serve plaintext on an address other than loopback (without `[tls]`), with a warning at
    /// every start. Default: false (refused).
    pub allow_plaintext: bool,
    /// The HTTP port: metrics, health, the JSON API and the web console.
    pub http: HttpConfig,
    /// Settings of every partition log.
    pub log: LogConfig,
    /// Consumer groups: ack timeout, delivery limit, in-flight bounds.
    pub groups: GroupsConfig,
    /// TLS on the gRPC port (see docs/security.md).
    pub tls: TlsConfig,
    /// Principals, grants and the audit trail's retention (see docs/security.md).
    pub auth: AuthConfig,
    /// Cluster mode: this node, its peers, replication (see docs/replication.md). Off without
    /// `peers`.
    pub cluster: ClusterConfig,
    /// The file the settings came from, read again on SIGHUP (not a setting).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// What the settings used that is deprecated, said as a warning once logging is up (not a
    /// setting).
    #[serde(skip)]
    pub deprecations: Vec<String>,
    /// Benchmarks only (not a setting: no file, variable or flag sets it): Send handlers answer
    /// at once and store nothing, so the server measures the transport's floor. Set only by
    /// [`crate::cli::run_floor`], which the `sluice` binary does not call.
    #[serde(skip)]
    pub answer_sends_without_storing: bool,
}

/// `[groups]`: consumer groups (docs/consumer-groups.md). Until this release these were the
/// top-level `group_*` settings; those names are still read, with a deprecation warning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    /// A group delivery not acknowledged within this many ms is delivered again. Default: 30000.
    pub ack_timeout_ms: u64,
    /// Deliveries of one message to a group before it goes to `<topic>.dlq`. Default: 5.
    pub max_deliveries: u32,
    /// Most unacknowledged deliveries a group member may ask for. Default: 10000.
    pub max_in_flight: usize,
    /// Unacknowledged deliveries per member when the subscription does not say. Default: 2000,
    /// enough to cover a cluster's commit of each delivery (docs/consumer-groups.md).
    pub default_in_flight: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            max_in_flight: 10_000,
            default_in_flight: 2000,
        }
    }
}

/// The top-level names of `[groups]`' settings before it existed: read for one more release.
const DEPRECATED_GROUP_SETTINGS: [(&str, &str); 4] = [
    ("group_ack_timeout_ms", "ack_timeout_ms"),
    ("group_max_deliveries", "max_deliveries"),
    ("group_max_in_flight", "max_in_flight"),
    ("group_default_in_flight", "default_in_flight"),
];

/// Moves a deprecated top-level `group_*` key into `[groups]`, saying so in `deprecations`;
/// `what` names it as the user wrote it (`FILE: group_max_deliveries`, or the variable).
fn move_deprecated_group_setting(
    table: &mut toml::Table,
    key: &str,
    value: toml::Value,
    what: &str,
    deprecations: &mut Vec<String>,
) -> Result<bool, ConfigError> {
    let Some((_, field)) = DEPRECATED_GROUP_SETTINGS
        .iter()
        .find(|(old, _)| *old == key)
    else {
        return Ok(false);
    };
    let groups = table
        .entry("groups")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(groups) = groups.as_table_mut() else {
        return Err(ConfigError::Invalid(
            "groups must be a table ([groups])".into(),
        ));
    };
    if groups.contains_key(*field) {
        return Err(ConfigError::Invalid(format!(
            "{what} and groups.{field} are both set: {key} is the deprecated name of \
             groups.{field}; keep only the latter"
        )));
    }
    groups.insert(field.to_string(), value);
    deprecations.push(format!(
        "{what} is deprecated and will be refused in the next release; use [groups] {field} \
         (SLUICE_GROUPS_{})",
        field.to_ascii_uppercase()
    ));
    Ok(true)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            auto_create_topics: true,
            default_partitions: 1,
            max_message_bytes: 1 << 20,
            max_batch_messages: 10_000,
            max_request_bytes: 16 << 20,
            max_connections: 1024,
            max_concurrent_streams: 1024,
            handshake_timeout_ms: 5000,
            idle_timeout_ms: 300_000,
            shutdown_timeout_ms: 10_000,
            subscriber_buffer: 8,
            delivery_batch_bytes: 256 << 10,
            retention_check_ms: 300_000,
            send_spin_us: 500,
            send_inline_sync_us: 2000,
            writer_threads: 0,
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            allow_plaintext: false,
            http: HttpConfig::default(),
            log: LogConfig::default(),
            groups: GroupsConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            cluster: ClusterConfig::default(),
            config_file: None,
            deprecations: Vec::new(),
            answer_sends_without_storing: false,
        }
    }
}

impl Config {
    /// Reads the file (if any), then applies `SLUICE_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let table =
                    toml::from_str::<toml::Table>(&text).map_err(|source| ConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })?;
                refuse_loose_secrets(path, &table)?;
                table
            }
            None => toml::Table::new(),
        };
        let mut deprecations = Vec::new();
        let from = file.map_or("the config".to_string(), |p| p.display().to_string());
        for (old, _) in DEPRECATED_GROUP_SETTINGS {
            if let Some(value) = table.remove(old) {
                let what = format!("{from}: {old}");
                move_deprecated_group_setting(&mut table, old, value, &what, &mut deprecations)?;
            }
        }
        apply_env(&mut table, env, &mut deprecations)?;
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.deprecations = deprecations;
        Ok(config)
    }

    /// Rejects nonsense with a message naming the field.
    pub fn sanitize(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        self.log
            .sanitize()
            .map_err(|e| ConfigError::Invalid(format!("log: {e}")))?;
        if self.default_partitions == 0 || self.default_partitions > 1024 {
            return bad("default_partitions must be between 1 and 1024");
        }
        if self.max_message_bytes == 0 {
            return bad("max_message_bytes must be at least 1");
        }
        if self.max_message_bytes + 1024 > self.log.max_batch_bytes {
            return bad("max_message_bytes must leave 1 KiB of room below log.max_batch_bytes");
        }
        if self.max_batch_messages == 0 {
            return bad("max_batch_messages must be at least 1");
        }
        if self.max_request_bytes < self.max_message_bytes {
            return bad("max_request_bytes must be at least max_message_bytes");
        }
        if self.max_connections == 0 || self.max_concurrent_streams == 0 {
            return bad("max_connections and max_concurrent_streams must be at least 1");
        }
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return bad("handshake_timeout_ms and idle_timeout_ms must be at least 1");
        }
        if self.http.max_connections == 0 || self.http.header_timeout_ms == 0 {
            return bad("http.max_connections and http.header_timeout_ms must be at least 1");
        }
        let g = &self.groups;
        if g.ack_timeout_ms == 0 || g.max_deliveries == 0 {
            return bad("groups.ack_timeout_ms and groups.max_deliveries must be at least 1");
        }
        if g.default_in_flight == 0 || g.default_in_flight > g.max_in_flight {
            return bad("groups.default_in_flight must be between 1 and groups.max_in_flight");
        }
        if self.subscriber_buffer == 0 || self.delivery_batch_bytes == 0 {
            return bad("subscriber_buffer and delivery_batch_bytes must be at least 1");
        }
        Policy::from_config(&self.auth).map_err(ConfigError::Invalid)?;
        if let Some(members) = self.cluster.members().map_err(ConfigError::Invalid)? {
            if !members.listen.ip().is_loopback() && !self.tls.enabled() && !self.allow_plaintext {
                return Err(ConfigError::Invalid(format!(
                    "cluster.listen = {}: the cluster port is plaintext without [tls]; beyond \
                     this machine it needs [tls] (mutual TLS between the nodes) or \
                     allow_plaintext = true, on a private network only (docs/replication.md)",
                    members.listen
                )));
            }
            if self.tls.enabled() && self.tls.client_ca_file.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(
                    "a cluster node with [tls] needs tls.client_ca_file: the CA that signed every \
                     node's certificate (the nodes authenticate each other with mutual TLS)"
                        .into(),
                ));
            }
        }
        if let Some(http) = self.http.addr()?
            && !http.ip().is_loopback()
            && !self.allow_plaintext
        {
            return Err(ConfigError::Invalid(format!(
                "http.listen = {http}: the HTTP port is plaintext; beyond this machine it needs \
                 allow_plaintext = true (or a TLS proxy in front of a loopback address)"
            )));
        }
        if !self.listen.ip().is_loopback() && !self.tls.enabled() && !self.allow_plaintext {
            return Err(ConfigError::Invalid(format!(
                "listen = {}: serving plaintext beyond this machine needs [tls] (or \
                 allow_plaintext = true, which sends tokens and data unencrypted)",
                self.listen
            )));
        }
        Ok(())
    }
}

/// Refuses a config file holding token hashes that anyone but its owner can read or write, as
/// ssh refuses a loose private key.
fn refuse_loose_secrets(path: &Path, table: &toml::Table) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let holds_tokens = table
        .get("auth")
        .and_then(|a| a.get("principals"))
        .and_then(|p| p.as_array())
        .is_some_and(|ps| ps.iter().any(|p| p.get("token_sha256").is_some()));
    if !holds_tokens {
        return Ok(());
    }
    let mode = std::fs::metadata(path)
        .map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{} holds token hashes and its permissions are {:o}: others may read or change \
             it; run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// Variables of the client commands (and `RUST_LOG`'s sibling) and of the repository's
/// scripts, not settings of the broker: a shell that exports them can still run `sluice serve`.
const CLIENT_VARIABLES: [&str; 9] = [
    "SLUICE_LOG",
    "SLUICE_CONFIG",
    // The `sluice` binary the repository's scripts run (examples/run.sh, tests/browser/run.sh).
    "SLUICE_BIN",
    "SLUICE_BROKER",
    "SLUICE_TOKEN",
    "SLUICE_TLS_CA",
    "SLUICE_TLS_CERT",
    "SLUICE_TLS_KEY",
    "SLUICE_TLS_DOMAIN",
];

/// Applies `SLUICE_<KEY>` / `SLUICE_<SECTION>_<KEY>` onto the table, checking each against the
/// known fields so a typo is an error, not a silent no-op.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    deprecations: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::Invalid(format!("cannot describe defaults: {e}")))?;
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("SLUICE_") else {
            continue;
        };
        let key = rest.to_ascii_lowercase();
        let value = parse_env_value(&raw);
        if move_deprecated_group_setting(table, &key, value.clone(), &name, deprecations)? {
            continue;
        }
        if defaults.contains_key(&key) && !defaults[&key].is_table() {
            table.insert(key, value);
            continue;
        }
        let section = defaults.iter().find_map(|(section, v)| {
            let sub = v.as_table()?;
            let field = key.strip_prefix(section.as_str())?.strip_prefix('_')?;
            sub.contains_key(field)
                .then(|| (section.clone(), field.to_string()))
        });
        match section {
            Some((section, field)) => {
                let sub = table
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match sub.as_table_mut() {
                    Some(t) => {
                        t.insert(field, value);
                    }
                    None => {
                        return Err(ConfigError::Env {
                            name,
                            reason: "its section is not a table in the config file".into(),
                        });
                    }
                }
            }
            None if CLIENT_VARIABLES.contains(&name.as_str()) => {}
            None => {
                return Err(ConfigError::Env {
                    name,
                    reason: "no such setting".into(),
                });
            }
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FsyncPolicy;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file_and_reaches_nested_settings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nmax_message_bytes = 2048\n[log]\nfsync = \"interval\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("SLUICE_MAX_MESSAGE_BYTES", "4096"),
                ("SLUICE_LOG_SEGMENT_BYTES", "1048576"),
                ("SLUICE_DATA_DIR", "/tmp/x"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.max_message_bytes, 4096);
        assert_eq!(c.log.fsync, FsyncPolicy::Interval);
        assert_eq!(c.log.segment_bytes, 1 << 20);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        c.sanitize().unwrap();
    }

    #[test]
    fn unknown_settings_and_nonsense_are_named() {
        let err = Config::load(None, env(&[("SLUICE_LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("SLUICE_LISTN"), "{err}");
        let err = Config::load(None, env(&[("SLUICE_LOG_FSYNC", "sometimes")])).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        let c = Config {
            default_partitions: 0,
            ..Config::default()
        };
        assert!(
            c.sanitize()
                .unwrap_err()
                .to_string()
                .contains("default_partitions")
        );
        // The HTTP port's limits: none may be zero (a port that takes no connection, or closes
        // each before its first request).
        for (name, value) in [
            ("SLUICE_HTTP_MAX_CONNECTIONS", "0"),
            ("SLUICE_HTTP_HEADER_TIMEOUT_MS", "0"),
        ] {
            let c = Config::load(None, env(&[(name, value)])).unwrap();
            let err = c.sanitize().unwrap_err();
            assert!(err.to_string().contains("http."), "{name}: {err}");
        }
        let c = Config::load(None, env(&[("SLUICE_HTTP_MAX_CONNECTIONS", "5")])).unwrap();
        assert_eq!(c.http.max_connections, 5);
    }

    /// Only the benchmarks' `sluice-floor` answers Sends without storing them: no file or
    /// variable turns that on for `sluice serve`.
    #[test]
    fn answering_sends_without_storing_is_not_a_setting() {
        let err = Config::load(
            None,
            env(&[("SLUICE_ANSWER_SENDS_WITHOUT_STORING", "true")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("SLUICE_ANSWER_SENDS_WITHOUT_STORING"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, "answer_sends_without_storing = true\n").unwrap();
        let err = Config::load(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("answer_sends_without_storing"),
            "{err}"
        );
        assert!(!Config::default().answer_sends_without_storing);
    }

    #[test]
    fn client_variables_are_not_broker_settings_and_tls_settings_are() {
        for name in CLIENT_VARIABLES {
            let c =
                Config::load(None, env(&[(name, "/x")])).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c, Config::default(), "{name}");
        }
        let c = Config::load(
            None,
            env(&[
                ("SLUICE_TOKEN", "t"),
                ("SLUICE_TLS_CA", "/ca.pem"),
                ("SLUICE_TLS_DOMAIN", "localhost"),
                ("SLUICE_TLS_CERT_FILE", "/broker.pem"),
                ("SLUICE_AUTH_REQUIRED", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.tls.cert_file, PathBuf::from("/broker.pem"));
        assert!(c.auth.required);
    }

    /// Every file of the repository a user reads or runs, recursively (no build output).
    fn repository_text_files() -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = vec![root.join("README.md"), root.join("sluice.toml")];
        let mut stack: Vec<PathBuf> = ["benches", "examples", "docs", "tests", ".ci", "clients"]
            .iter()
            .map(|d| root.join(d))
            .collect();
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if name == "node_modules" || name.starts_with('.') && name != ".ci" {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else if ["sh", "md", "py", "js", "mjs", "toml", "rs", ""]
                    .contains(&p.extension().and_then(|x| x.to_str()).unwrap_or(""))
                {
                    out.push(p);
                }
            }
        }
        out
    }

    #[test]
    fn every_sluice_variable_the_repository_names_is_a_setting_or_a_client_variable() {
        let mut seen = std::collections::BTreeSet::new();
        for file in repository_text_files() {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let mut rest = text.as_str();
            while let Some(i) = rest.find("SLUICE_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(tail.len());
                let name = tail[..end].trim_end_matches('_');
                if name.len() > "SLUICE_".len() {
                    seen.insert((name.to_string(), file.clone()));
                }
                rest = &tail[end..];
            }
        }
        assert!(
            seen.iter().any(|(n, _)| n == "SLUICE_BIN"),
            "the scan found nothing"
        );
        for (name, file) in seen {
            // A value the setting may refuse; what must not happen is "no such setting".
            if let Err(e) = Config::load(None, env(&[(name.as_str(), "1")])) {
                assert!(
                    !e.to_string().contains("no such setting"),
                    "{} names {name}: {e}",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn the_example_config_file_names_every_setting() {
        fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                let path = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(sub) => keys(&format!("{path}."), sub, out),
                    _ => out.push(path),
                }
            }
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.toml");
        let file: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let (mut in_file, mut settings) = (Vec::new(), Vec::new());
        keys("", &file, &mut in_file);
        keys("", &defaults, &mut settings);
        let text = std::fs::read_to_string(&path).unwrap();
        // A list of tables empty by default (principals, grants) is shown as a commented example
        // of one entry: `# [[auth.principals]]`.
        let shown = |k: &String| in_file.contains(k) || text.contains(&format!("[[{k}]]"));
        let missing: Vec<_> = settings.iter().filter(|k| !shown(k)).collect();
        assert!(missing.is_empty(), "sluice.toml lacks {missing:?}");
    }

    #[test]
    fn the_flat_group_names_still_work_with_a_deprecation_and_cannot_contradict_groups() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, "group_max_deliveries = 3\n").unwrap();
        let c = Config::load(Some(&file), env(&[("SLUICE_GROUP_ACK_TIMEOUT_MS", "250")])).unwrap();
        assert_eq!(c.groups.max_deliveries, 3);
        assert_eq!(c.groups.ack_timeout_ms, 250);
        assert_eq!(c.deprecations.len(), 2, "{:?}", c.deprecations);
        assert!(
            c.deprecations.iter().any(
                |d| d.contains("group_max_deliveries") && d.contains("[groups] max_deliveries")
            )
        );
        assert!(
            c.deprecations
                .iter()
                .any(|d| d.contains("SLUICE_GROUP_ACK_TIMEOUT_MS"))
        );
        // The new names, without a warning.
        std::fs::write(&file, "[groups]\nmax_deliveries = 4\n").unwrap();
        let c = Config::load(Some(&file), env(&[("SLUICE_GROUPS_MAX_IN_FLIGHT", "50")])).unwrap();
        assert_eq!((c.groups.max_deliveries, c.groups.max_in_flight), (4, 50));
        assert!(c.deprecations.is_empty());
        // Both names for one setting: refused, naming both.
        std::fs::write(
            &file,
            "group_max_deliveries = 3\n[groups]\nmax_deliveries = 4\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("group_max_deliveries") && err.contains("groups.max_deliveries"),
            "{err}"
        );
    }

    #[test]
    fn a_plaintext_cluster_port_beyond_loopback_needs_allow_plaintext() {
        let peers = r#"["1@10.0.0.1:7170","2@10.0.0.2:7170","3@10.0.0.3:7170"]"#;
        let vars = [
            ("SLUICE_CLUSTER_NODE_ID", "1"),
            ("SLUICE_CLUSTER_PEERS", peers),
            ("SLUICE_CLUSTER_LISTEN", "0.0.0.0:7170"),
        ];
        let c = Config::load(None, env(&vars)).unwrap();
        let err = c.sanitize().unwrap_err().to_string();
        assert!(err.contains("cluster port is plaintext"), "{err}");
        let with_tls = Config {
            tls: crate::auth::tls::TlsConfig {
                cert_file: "/node.pem".into(),
                key_file: "/node.key".into(),
                ..Default::default()
            },
            ..c.clone()
        };
        let err = with_tls.sanitize().unwrap_err().to_string();
        assert!(err.contains("needs tls.client_ca_file"), "{err}");
        let c = Config {
            allow_plaintext: true,
            ..c
        };
        c.sanitize().unwrap();
        assert_eq!(c.cluster.members().unwrap().unwrap().peers.len(), 3);
    }

    #[test]
    fn the_example_config_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sluice.toml");
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!(c, Config::default());
    }
}

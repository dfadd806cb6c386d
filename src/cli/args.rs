//! The command line's grammar: every subcommand's arguments (clap derive), and the one rule
//! applied to all of them (an option's value may start with `-`). Nothing here runs a command;
//! `cli/mod.rs` dispatches and each command's file does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;
use crate::storage::FsyncPolicy;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "A durable message broker")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line's grammar: the derived one, with every option's value taken as written
    /// even when it starts with `-` (`--from -15m`, `--to -2h`, `-K -`, a negative number), so
    /// `--flag VALUE` and `--flag=VALUE` always mean the same. (clap's default reads such a value
    /// as an unknown flag in the first form only.)
    pub fn command() -> clap::Command {
        values_may_start_with_a_dash(<Cli as clap::CommandFactory>::command())
    }

    /// Parses the process's arguments; prints help or the error and exits when they ask for it.
    pub fn parse_args() -> Cli {
        Self::parse_from_args(std::env::args_os())
    }

    /// Parses `args` (the program's name first), exiting as [`Cli::parse_args`] does.
    pub fn parse_from_args<I, T>(args: I) -> Cli
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from_args(args).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the program's name first).
    pub fn try_parse_from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut matches = Self::command().try_get_matches_from(args)?;
        <Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut matches)
    }
}

fn values_may_start_with_a_dash(command: clap::Command) -> clap::Command {
    command
        .mut_args(|a| {
            let option = !a.is_positional() && a.get_action().takes_values();
            a.allow_hyphen_values(option)
        })
        .mut_subcommands(values_may_start_with_a_dash)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Send each line of standard input as one message.
    Produce(ProduceArgs),
    /// Print messages of a topic, one value per line.
    Consume(ConsumeArgs),
    /// Manage topics.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Manage consumer groups.
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// Maintenance: retention of old segments, offline (--data-dir) or through a running broker.
    Compact(CompactArgs),
    /// Check every CRC, index and state file of a data directory (read-only).
    Verify(VerifyArgs),
    /// Print the records of a partition from a data directory (read-only).
    Dump(DumpArgs),
    /// Access control helpers.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Print the audit trail (`_audit`), online (--broker) or offline (--data-dir).
    Audit(AuditArgs),
    /// A cluster's nodes and groups.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The nodes (reachable or not), the metadata leader, and each partition's leader and
    /// replicas with how far each is behind; exits 1 when a group has no leader.
    Status {
        #[command(flatten)]
        broker: BrokerArg,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Moves a partition's leadership to one of its replicas; returns once that node leads.
    /// Sends to the partition wait meanwhile (about one election timeout), none is refused.
    TransferLeader {
        #[command(flatten)]
        broker: BrokerArg,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: u32,
        /// The node id to lead it.
        #[arg(long)]
        to: u64,
    },
    /// Spreads partition leaders across the nodes (none leads more than ceil(partitions /
    /// nodes) where the replicas allow it); prints each move and how many partitions each
    /// node leads afterwards. Exits 1 when a move failed.
    Rebalance {
        #[command(flatten)]
        broker: BrokerArg,
        /// Print the moves it would make; make none.
        #[arg(long)]
        dry_run: bool,
    },
    /// Adds a node, started first with `cluster.join = true`, to the cluster: every topic held
    /// by every node gains a replica on it. Shows progress; returns once every such group has
    /// it as a voter.
    AddNode {
        #[command(flatten)]
        broker: BrokerArg,
        /// The node's id and cluster port, `ID@HOST:PORT`.
        node: String,
    },
    /// Removes a node from the cluster: every replica it holds goes (a topic on some of the
    /// nodes gets a replica on another node in its place). Shows progress; returns
    /// once no group has it as a voter (then stop its process).
    RemoveNode {
        #[command(flatten)]
        broker: BrokerArg,
        /// The node's id.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Make a new bearer token for a principal: prints the token once, and the lines to paste
    /// into the config file (which holds only its SHA-256).
    Token {
        /// The principal's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see sluice.toml). Settings: file < SLUICE_* environment < flags.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070]; port 0 picks a free port.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// HTTP port for metrics, health, the JSON API and the console [default: 127.0.0.1:7071];
    /// "" turns it off, port 0 picks a free port.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Durability: always (fdatasync before answering), interval, never.
    #[arg(long, value_parser = parse_fsync)]
    pub fsync: Option<FsyncPolicy>,
    /// Create topics on their first Send [default: true].
    #[arg(long)]
    pub auto_create_topics: Option<bool>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "interval" => Ok(FsyncPolicy::Interval),
        "never" => Ok(FsyncPolicy::Never),
        _ => Err(format!("{s:?} is not one of always, interval, never")),
    }
}

#[derive(Debug, Args, Clone)]
pub struct BrokerArg {
    /// Broker address: host:port, http://host:port, or https://host:port (TLS).
    #[arg(long, env = "SLUICE_BROKER", default_value = "127.0.0.1:7070")]
    pub broker: String,
    #[command(flatten)]
    pub credentials: Credentials,
}

/// How a client proves who it is and checks the broker (see docs/security.md).
#[derive(Debug, Args, Clone, Default)]
pub struct Credentials {
    /// Bearer token (`sluice auth token` makes one; it may start with `-`).
    #[arg(
        long,
        env = "SLUICE_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub token: Option<String>,
    /// PEM CA certificate that signs the broker's certificate (implies TLS) [default: the
    /// system's roots for https:// addresses].
    #[arg(long, env = "SLUICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --tls-key).
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the broker's certificate must carry [default: the address's host].
    #[arg(long, env = "SLUICE_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long)]
    pub topic: String,
    /// Key of every message (messages with one key keep their order).
    #[arg(long)]
    pub key: Option<String>,
    /// Partition of every message (overrides the key).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Print each message's partition and offset.
    #[arg(long, short)]
    pub verbose: bool,
    /// text: a line is a message, with its key before --key-separator if given; json: a line
    /// is an object as `consume --format json` prints it (key, value or value_base64, headers,
    /// partition); raw: all of standard input is one message (binary).
    #[arg(long, value_enum, default_value = "text")]
    pub format: InputFormat,
    /// With text: what separates a line's key from its value (kcat's -K).
    #[arg(long, short = 'K')]
    pub key_separator: Option<String>,
    /// A header of every message, key=value (repeatable; kcat's -H).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// The message's id, for an idempotent Send (with --format raw, or one line of input): a
    /// retry with the same id is not stored again.
    #[arg(long, conflicts_with = "id_from_key")]
    pub id: Option<String>,
    /// Each message's key is also its id (idempotent Send; a message without a key has none).
    #[arg(long)]
    pub id_from_key: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    Text,
    Json,
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long)]
    pub topic: String,
    /// Where to start: earliest, latest, an offset, an RFC 3339 time with any offset
    /// (2026-11-28T10:00:00+01:00), or a time ago (-15m, -2h, -1d).
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Exit after this many messages (otherwise follow the tail until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Only these partitions (repeatable).
    #[arg(long)]
    pub partition: Vec<u32>,
    /// text: each value on a line; json: every field, one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// With text: print each message's key before its value, followed by this (kcat's -K).
    #[arg(long, short = 'K')]
    pub key_separator: Option<String>,
    /// With text: print each message's headers (k=v,k=v) before it, followed by the key
    /// separator (a tab without one).
    #[arg(long)]
    pub print_headers: bool,
    /// Consume as a member of this consumer group, acknowledging each message once printed.
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: unacknowledged messages this member holds at most (0: the broker's
    /// default). With --count, the member is never given more than it prints.
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// List consumer groups and their topics.
    List {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show members and, per partition, committed offset, end, lag, in flight, redeliveries.
    Describe {
        #[command(flatten)]
        broker: BrokerArg,
        group: String,
    },
    /// Move a group's position on a topic.
    Reset {
        #[command(flatten)]
        broker: BrokerArg,
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest, an offset, or an RFC 3339 time.
        #[arg(long)]
        to: String,
        /// Only this partition (repeatable; default: every partition). Moves a group past
        /// damage in one partition without touching the others.
        #[arg(long)]
        partition: Vec<u32>,
        /// Reset even while members are connected.
        #[arg(long)]
        force: bool,
    },
    /// Delete a group's state.
    Delete {
        #[command(flatten)]
        broker: BrokerArg,
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create a topic.
    Create {
        #[command(flatten)]
        broker: BrokerArg,
        name: String,
        #[arg(long)]
        partitions: Option<u32>,
        /// Keep only the newest message per key.
        #[arg(long)]
        compact: bool,
        #[arg(long)]
        retention_ms: Option<u64>,
        #[arg(long)]
        retention_bytes: Option<u64>,
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// How long message ids are remembered, in ms (0: no idempotent Send). Default 24 h.
        #[arg(long)]
        dedup_window_ms: Option<u64>,
        /// Cluster mode: nodes holding each partition. Default: the cluster's setting.
        #[arg(long)]
        replication_factor: Option<u32>,
    },
    /// List topics.
    List {
        #[command(flatten)]
        broker: BrokerArg,
    },
    /// Show a topic's settings and partitions.
    Describe {
        #[command(flatten)]
        broker: BrokerArg,
        name: String,
    },
    /// Delete a topic and all its messages.
    Delete {
        #[command(flatten)]
        broker: BrokerArg,
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// A stopped broker's data directory [default: ./data]. Given, it wins over SLUICE_BROKER.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A running broker to ask instead (its data directory is locked).
    #[arg(long, env = "SLUICE_BROKER")]
    pub broker: Option<String>,
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub credentials: Credentials,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data directory to check (read-only; safe while a broker runs).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct DumpArgs {
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub topic: String,
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    #[arg(long)]
    pub count: Option<u64>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
}

/// Checks everything; prints each problem as `path:byte: what`. Fails when any is found.

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Read a stopped (or running) broker's data directory instead of asking a broker; repeat
    /// it with each cluster node's directory to see their trails merged.
    #[arg(long)]
    pub data_dir: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArg,
    /// Read the trail of the cluster node serving clients at ADDR instead of --broker's (with
    /// --broker's credentials); repeat it for each node to see every node's trail, merged by
    /// time, each chain checked.
    #[arg(long = "node", value_name = "ADDR", conflicts_with = "data_dir")]
    pub nodes: Vec<String>,
    /// Only records from this time on (RFC 3339, or a time ago like -2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records of this principal.
    #[arg(long)]
    pub principal: Option<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    /// Every leaf subcommand's path (`["groups", "reset"]`) with its command.
    fn leaves(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        if cmd.get_subcommands().next().is_none() {
            out.push((path, cmd.clone()));
            return;
        }
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            leaves(sub, p, out);
        }
    }

    /// `sluice PATH…` with every required argument but `skip` given a plain value.
    fn base_args(path: &[String], cmd: &clap::Command, skip: &str) -> Vec<String> {
        let mut args = vec!["sluice".to_string()];
        args.extend(path.iter().cloned());
        for a in cmd.get_arguments().filter(|a| a.is_required_set()) {
            if a.get_id() == skip {
                continue;
            }
            match a.get_long() {
                Some(long) => args.extend([format!("--{long}"), "1".into()]),
                None => args.push("x".into()),
            }
        }
        args
    }

    #[test]
    fn every_option_takes_a_value_starting_with_a_dash_in_both_forms() {
        let mut all = Vec::new();
        let root = Cli::command();
        leaves(&root, Vec::new(), &mut all);
        let mut accepted = Vec::new();
        for (path, cmd) in &all {
            for a in cmd.get_arguments() {
                let (Some(long), true) = (a.get_long(), a.get_action().takes_values()) else {
                    continue;
                };
                if a.is_positional() {
                    continue;
                }
                for value in ["-15m", "-1", "-"] {
                    let base = base_args(path, cmd, a.get_id().as_str());
                    let mut joined = base.clone();
                    joined.push(format!("--{long}={value}"));
                    let mut spaced = base.clone();
                    spaced.extend([format!("--{long}"), value.to_string()]);
                    let what = format!("sluice {} --{long} {value}", path.join(" "));
                    let j = Cli::command().try_get_matches_from(&joined);
                    let s = Cli::command().try_get_matches_from(&spaced);
                    match (j, s) {
                        (Ok(_), Ok(_)) => {
                            // Same meaning: the typed parse of both agrees.
                            let a1 = Cli::try_parse_from_args(&joined).map(|c| format!("{c:?}"));
                            let a2 = Cli::try_parse_from_args(&spaced).map(|c| format!("{c:?}"));
                            assert_eq!(a1.ok(), a2.ok(), "{what}");
                            accepted.push(format!("{} --{long} {value}", path.join(" ")));
                        }
                        (Err(je), Err(se)) => assert_eq!(je.kind(), se.kind(), "{what}"),
                        (Ok(_), Err(e)) => panic!("{what}: only the = form parses: {e}"),
                        (Err(e), Ok(_)) => panic!("{what}: only the spaced form parses: {e}"),
                    }
                }
            }
        }
        // The README's own forms are among them (the test is not vacuous).
        for needed in [
            "consume --from -15m",
            "audit --since -15m",
            "groups reset --to -15m",
            "produce --key-separator -",
        ] {
            assert!(
                accepted.iter().any(|a| a == needed),
                "{needed} not accepted"
            );
        }
        // And a dash value is still an error where the type refuses it, not an unknown flag.
        let e = Cli::try_parse_from_args(["sluice", "consume", "--topic", "t", "--count", "-1"])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation, "{e}");
    }
}

//! The offline tools: `verify` and `dump` read a data directory's files directly.

use std::io::Write;
use std::path::PathBuf;

use base64::Engine;

use crate::broker::groups::events::Event;
use crate::storage::StoredRecord;
use crate::storage::verify::{Verifier, for_each_record};

use super::args::{DumpArgs, OutputFormat, VerifyArgs};
use super::data_dir::data_dir_or_refuse;
use super::error::CliError;
use super::lines::delivery_json;
use crate::broker::Delivery;
use crate::server::delivery_to_pb;

pub fn verify(args: VerifyArgs) -> Result<(), CliError> {
    data_dir_or_refuse(&args.data_dir)?;
    let mut v = Verifier::default();
    v.check_topics(&args.data_dir);
    let groups = args.data_dir.join("groups");
    let check = |r: &StoredRecord| {
        Event::decode(r.value.as_deref().unwrap_or_default())
            .map(|_| ())
            .map_err(|why| format!("group event: {why}"))
    };
    if let Ok(entries) = std::fs::read_dir(&groups) {
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .flat_map(|g| std::fs::read_dir(g.path()).into_iter().flatten().flatten())
            .map(|t| t.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            v.check_records(&dir, Some(&check));
        }
    }
    let mut out = std::io::stdout().lock();
    for p in &v.problems {
        writeln!(out, "{p}")?;
    }
    for n in &v.notes {
        writeln!(out, "note: {n}")?;
    }
    let breaks = super::audit::verify_chain(&args.data_dir)?;
    let trail = super::audit::audit_dir(&args.data_dir);
    for b in &breaks {
        writeln!(
            out,
            "{}: audit record {}: {}",
            trail.display(),
            b.offset,
            b.problem
        )?;
    }
    let problems = v.problems.len() + breaks.len();
    let s = &v.summary;
    writeln!(
        out,
        "checked {} partitions, {} segments, {} batches, {} records, {} bytes: {} problems{}",
        s.partitions,
        s.segments,
        s.batches,
        s.records,
        s.bytes,
        problems,
        match v.notes.len() {
            0 => String::new(),
            n => format!(", {n} notes (repaired by the broker at its next start)"),
        }
    )?;
    if problems == 0 {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{} problems found in {}",
            problems,
            args.data_dir.display()
        )))
    }
}

fn text_or_base64(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        ),
    }
}

/// Prints the records of one partition.
pub fn dump(args: DumpArgs) -> Result<(), CliError> {
    data_dir_or_refuse(&args.data_dir)?;
    crate::storage::validate_topic_name(&args.topic).map_err(|e| CliError::Usage(e.to_string()))?;
    let dir = args
        .data_dir
        .join("topics")
        .join(&args.topic)
        .join(args.partition.to_string());
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "no partition {} of topic {:?} in {}",
            args.partition,
            args.topic,
            args.data_dir.display()
        )));
    }
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    let mut failed = None;
    let damage = for_each_record(&dir, args.from, |r| {
        if args.count.is_some_and(|c| printed >= c) {
            return false;
        }
        let line = match args.format {
            OutputFormat::Text => format!(
                "offset={} timestamp={} key={} headers={{{}}} value={}",
                r.offset,
                r.timestamp,
                r.key.as_deref().map_or("-".to_string(), text_or_base64),
                r.headers
                    .iter()
                    .map(|h| format!("{}={}", h.key, text_or_base64(&h.value)))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.value
                    .as_deref()
                    .map_or("(tombstone)".to_string(), text_or_base64)
            ),
            // The same JSON as `sluice consume --format json`.
            OutputFormat::Json => delivery_json(&delivery_to_pb(
                &args.topic,
                Delivery {
                    partition: args.partition,
                    record: r,
                    attempt: 1,
                    ack_id: String::new(),
                },
            ))
            .to_string(),
        };
        if let Err(e) = writeln!(out, "{line}") {
            failed = Some(e);
            return false;
        }
        printed += 1;
        true
    })
    .map_err(|e| CliError::Usage(e.to_string()))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    for d in &damage {
        crate::logging::say(format_args!("damaged: {d}"));
    }
    if damage.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{} damaged range(s) in {}: the records listed above were skipped (`sluice verify` \
             checks the whole directory)",
            damage.len(),
            dir.display()
        )))
    }
}

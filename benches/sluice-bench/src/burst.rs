//! `sluice-bench burst`: the seed's own burst — one seed-API Send per patient, all started at
//! once over a few connections with tonic's client — and how long the last of them waits.

use std::time::Instant;

use clap::Args;
use tokio::task::JoinSet;

use sluice::cli::link;
use sluice::cli::{BrokerArg, CliError};

/// Options of `sluice-bench burst`.
#[derive(Debug, Args)]
pub struct BurstBench {
    #[command(flatten)]
    pub broker: BrokerArg,
    #[arg(long, default_value = "burst")]
    pub topic: String,
    /// Sends started at once.
    #[arg(long, default_value_t = 10_000)]
    pub sends: usize,
    /// Connections they share (tonic client).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Payload bytes per Send.
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
}

pub async fn burst(b: BurstBench) -> Result<(), CliError> {
    use sluice::proto::seed;
    let mut channels = Vec::with_capacity(b.connections.max(1));
    for _ in 0..b.connections.max(1) {
        channels.push(link(&b.broker).await?);
    }
    let payload = bytes::Bytes::from(vec![b'p'; b.size]);
    let request = |topic: &str| seed::SendRequest {
        msg: Some(seed::Message {
            topic: topic.to_string(),
            payload: payload.clone(),
        }),
    };
    // The topic exists before the burst (the seed API creates it on first use).
    seed::broker_client::BrokerClient::new(channels[0].clone())
        .send(request(&b.topic))
        .await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..b.sends {
        let mut client =
            seed::broker_client::BrokerClient::new(channels[i % channels.len()].clone());
        let req = request(&b.topic);
        tasks.spawn(async move {
            let t = Instant::now();
            let answer = client.send(req).await?.into_inner();
            Ok::<_, CliError>((answer.success, t.elapsed()))
        });
    }
    let mut latencies = Vec::with_capacity(b.sends);
    let mut failed = 0usize;
    while let Some(done) = tasks.join_next().await {
        let (ok, took) = done.map_err(|e| CliError::Usage(format!("task failed: {e}")))??;
        if !ok {
            failed += 1;
        }
        latencies.push(took);
    }
    let total = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "burst: {} seed-API Sends of {} B over {} connections: all answered in {:.0} ms, {} not successful; latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        b.sends,
        b.size,
        channels.len(),
        total.as_secs_f64() * 1e3,
        failed,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

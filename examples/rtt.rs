use std::time::Instant;
use sluice::proto::v1 as pb;
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args().nth(1).unwrap();
    let mut a = pb::admin_client::AdminClient::new(sluice::cli::connect(&addr).await.unwrap());
    let n = 20000;
    let t = Instant::now();
    for _ in 0..n { a.list_topics(pb::ListTopicsRequest{}).await.unwrap(); }
    println!("list_topics rtt {:.1} us", t.elapsed().as_secs_f64()*1e6/n as f64);
}

//! The HTTP port's paths and query strings (the JSON API, metrics, probes, the console's files)
//! against a broker running in this process (see `sluice_fuzz::broker`). The first byte picks a
//! method and a route; the rest is put where a user's text goes (a topic or group name, a query
//! string, a file name) as raw bytes on the request line. What must hold: every request gets an
//! HTTP answer whose status is not a server error (5xx would mean the broker failed, not the
//! request), and the port keeps serving: `GET /api/v1/topics` answers 200 after each input.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "DELETE", "OPTIONS"];
/// `{}` is where the input goes.
const ROUTES: &[&str] = &[
    "/api/v1/topics/{}",
    "/api/v1/topics/t/dead-letters?{}",
    "/api/v1/topics/{}/dead-letters?limit=5",
    "/api/v1/groups/{}",
    "/api/v1/groups?{}",
    "/api/v1/overview?{}",
    "/api/v1/cluster?{}",
    "/metrics?{}",
    "/{}",
];

/// The status of one request, or `None` when the connection closed without an answer.
async fn status(http: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    s.write_all(request).await.ok()?;
    let mut answer = Vec::new();
    // Bounded: a request the server is still waiting on (it thinks more is coming) is answered
    // by its header timeout, which is longer than a fuzzing run should wait.
    let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
    if read.is_err() && answer.is_empty() {
        return None;
    }
    let line = answer.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn request(method: &str, target: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n");
    r
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let method = METHODS[(pick as usize / ROUTES.len()) % METHODS.len()];
    let route = ROUTES[pick as usize % ROUTES.len()];
    let (before, after) = route.split_once("{}").unwrap();
    let mut target = before.as_bytes().to_vec();
    target.extend_from_slice(text);
    target.extend_from_slice(after.as_bytes());
    let b = sluice_fuzz::broker();
    b.rt.block_on(async {
        // A request line holding a line break or a space is malformed HTTP: an answer of 400 or
        // a closed connection are both fine; a request well formed must be answered.
        let malformed = text.iter().any(|c| matches!(c, b'\r' | b'\n' | b' '));
        match status(b.http, &request(method, &target)).await {
            Some(code) => assert!(
                code < 500,
                "{method} {:?} answered {code}",
                String::from_utf8_lossy(&target)
            ),
            None => assert!(
                malformed,
                "{method} {:?} got no answer",
                String::from_utf8_lossy(&target)
            ),
        }
        let canary = status(b.http, &request("GET", b"/api/v1/topics")).await;
        assert_eq!(
            canary,
            Some(200),
            "after {method} {:?}, GET /api/v1/topics",
            String::from_utf8_lossy(&target)
        );
    });
});

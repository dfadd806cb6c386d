//! The links between the test cluster's nodes: one TCP proxy per direction of each pair of
//! nodes (node `a`'s configuration names node `b` at the proxy of link a→b), so the test can
//! cut a node off from the others while clients still reach it.
//!
//! - **Cut** is a blackhole, as a failed switch or a firewall dropping packets: connections stay
//!   open, bytes stop moving (a node sees timeouts, not resets); what was in flight is held and
//!   delivered when the link heals, late, as TCP's retransmissions would.
//! - **A node that is down** refuses connections on every link into it (the proxy stops
//!   listening), as its own port would: a peer learns at once that nothing was delivered.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Every link of an `n`-node cluster.
pub struct Links {
    /// (from, to) → the proxy's port and whether the link is cut.
    links: BTreeMap<(usize, usize), (u16, watch::Sender<bool>)>,
    /// Whether each node is up (its links accept connections).
    up: Vec<Arc<watch::Sender<bool>>>,
}

impl Links {
    /// Proxies for every ordered pair of `ports` (each node's own cluster port), all healed,
    /// every node down until [`Links::up`]. Runs on the current tokio runtime.
    pub fn new(ports: &[u16], proxy_ports: impl IntoIterator<Item = u16>) -> Links {
        let up: Vec<_> = ports
            .iter()
            .map(|_| Arc::new(watch::Sender::new(false)))
            .collect();
        let mut proxy_ports = proxy_ports.into_iter();
        let mut links = BTreeMap::new();
        for from in 0..ports.len() {
            for to in (0..ports.len()).filter(|&to| to != from) {
                let port = proxy_ports.next().expect("a proxy port per link");
                let cut = watch::Sender::new(false);
                tokio::spawn(proxy(port, ports[to], up[to].subscribe(), cut.subscribe()));
                links.insert((from, to), (port, cut));
            }
        }
        Links { links, up }
    }

    /// The port node `from` reaches node `to` at.
    pub fn port(&self, from: usize, to: usize) -> u16 {
        self.links[&(from, to)].0
    }

    /// Node `i` is up (started) or down (killed): links into it accept or refuse connections.
    pub fn set_up(&self, i: usize, up: bool) {
        self.up[i].send_replace(up);
    }

    /// Cuts (or heals) every link into and out of node `i`.
    pub fn isolate(&self, i: usize, cut: bool) {
        for ((from, to), (_, link)) in &self.links {
            if *from == i || *to == i {
                link.send_replace(cut);
            }
        }
    }
}

/// Listens on `port` while the target is up and forwards each connection to `target`.
async fn proxy(port: u16, target: u16, mut up: watch::Receiver<bool>, cut: watch::Receiver<bool>) {
    loop {
        if up.wait_for(|u| *u).await.is_err() {
            return;
        }
        let listener = listen(port).await;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = up.wait_for(|u| !*u) => break, // down: refuse from now on
            };
            let Ok((inbound, _)) = accepted else { continue };
            let cut = cut.clone();
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                    return; // went down meanwhile: close
                };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(pipe(ri, wo, cut.clone()), pipe(ro, wi, cut));
            });
        }
    }
}

/// A listener on `port`, which the proxy's previous listener (or another cluster's) may take a
/// moment to let go of.
async fn listen(port: u16) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("proxy port {port}: {e}"),
        }
    }
}

/// Copies bytes one way while the link is not cut; holds them while it is.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

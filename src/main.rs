//! The `sluice` binary.

fn main() {
    eprintln!(
        "sluice {}: the broker's commands arrive with the server",
        env!("CARGO_PKG_VERSION")
    );
}

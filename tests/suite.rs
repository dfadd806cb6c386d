//! Every integration test in one binary (but `writer_priority`, which looks at every thread of
//! its process): each file under `tests/` is a module here, so that the test code and what it
//! instantiates of tonic and tokio are compiled and linked once rather than once per file (on
//! the 2-core machine this took the suite's build from ~22 minutes to a fraction of it).
//! Run one file's tests with `cargo test --release --test suite <file>::`.

mod client_input;
mod cluster;
mod common;
mod compaction;
mod damage;
mod dedup;
mod dedup_process;
mod delivery_limit;
mod edges;
mod faults;
mod fuzz_seeds;
mod groups;
mod http;
mod maintenance;
mod operator;
mod power_cut;
mod raft_group;
mod raft_storage;
mod readme;
mod security;
mod security_process;
mod server_api;
mod server_process;
mod shutdown;
mod storage_log;
mod storage_props;
mod storage_recovery;
mod structure;
mod upgrade;

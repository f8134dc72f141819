//! tickgate's integration tests, as one test binary: one link instead of one per file (the
//! binaries all link the server, the client and the load tools, so linking dominated the
//! build of the tests). Each file is a module; test names read `<module>::<test>`, so
//! `cargo test --test it delivery::` runs one file's tests.
//!
//! All tests share one process, so none may change what the process shares: no
//! `std::env::set_var` (a child process gets its environment through `Command::env`), no
//! `current_dir` change (children get `Command::current_dir`), no global panic hook. A global
//! `tracing` subscriber is installed by [`common::logs`] only, and records only while a test
//! holds its capture. The file-descriptor limit is the process's: `scripts/test.sh` raises it
//! to 20,000 (`expiry_at_scale` opens 10,000 connections while the other tests run). The
//! tests that load the machine, or that a loaded machine fails, hold [`common::exclusive`]
//! so that no two of them run side by side (as separate binaries they never did).
//!
//! Tests that need a program outside Rust are `#[ignore]`d with a reason naming it
//! (`nats-server`, `haproxy`, `prometheus`/`promtool`; `nats_netns` needs root for `ip netns` too,
//! and passes with `skipped: ...` without it); `scripts/test.sh` installs them and runs the
//! ignored tests too (`-- --include-ignored`).

mod common;

mod admin_cli;
mod admission;
mod auth_holes;
mod bad_input;
mod check_config;
mod cli_numbers;
mod delivery;
mod delivery_prop;
mod deploy_kit;
mod drain;
mod exact_answers;
mod expiry_at_scale;
mod fuzz_smoke;
mod haproxy_failover;
mod http_hardening;
mod issuer_cli;
mod jwks;
mod lame_duck;
mod lifecycle;
mod module_graph;
mod nats_edge;
mod nats_load;
mod nats_netns;
mod nats_publish;
mod nats_revoke;
mod observability;
mod overload;
mod readme_tour;
mod restart_epoch;
mod rfc6455;
mod shard_fault;
mod shared_keys;
mod stream;
mod subscribe_cli;
mod throttle;
mod tls;
mod token_times;

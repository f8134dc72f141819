//! tickgate's load tools: the load generator behind `tickgate load` (subscribers,
//! publishers, multi-process runs, server probes) and the side-by-side NATS peer harness
//! that `benches/compare.sh` drives. The server library does not link this crate; only the
//! `tickgate` binary does, for its `load` subcommand.
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | [`load`] | the load generator: options, subscriber and publisher roles, histograms, reports; `load::nats` is the NATS peer |
//! | [`cli`] | range-checked number parsers shared by the `tickgate` binary's subcommands |
//! | [`prom`] | the Prometheus text-format parser (the load tool's server probe and the integration tests read `/metrics` with it) |

pub mod cli;
pub mod load;
pub mod prom;

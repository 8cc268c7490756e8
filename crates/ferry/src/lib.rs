//! ferry: the binary's library half. `main.rs` only calls [`cli::main`].
//!
//! Layer: the top. This crate wires the lower crates together: it parses
//! flags into a [`config::NodeConfig`] (`cli.rs`), starts a node
//! ([`node::start`]: the primary's watch → seal → send loops or the
//! replica's receive → apply → ack loop), serves metrics and health
//! (`telemetry.rs`) and the control socket (`control.rs`), and runs the
//! one-command demo (`demo.rs`). Start reading at [`node`].

pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod events;
pub mod node;
pub mod status;
pub mod telemetry;

//! Subcommands of the `nla-engine` binary.

pub mod bench;
pub mod demo;
pub mod nla;
pub mod plan;

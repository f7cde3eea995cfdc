//! `rootcell pool serve|status`: the VM pool (see [`crate::pool`]).

use super::Global;
use crate::cli::PoolCommand;
use crate::pool::{holder, Shape};

/// Runs a `pool` subcommand; returns the exit status.
pub fn pool(g: &Global, command: PoolCommand) -> anyhow::Result<i32> {
    match command {
        PoolCommand::Serve => crate::pool::serve::serve(g),
        PoolCommand::Status => {
            let st = crate::pool::claim::status()?;
            println!("{}", serde_json::to_string_pretty(&st)?);
            Ok(0)
        }
        PoolCommand::Vm {
            name,
            run_dir,
            memory_mib,
            vcpus,
            server_pid,
            claimed_for: _,
        } => Ok(holder::main(holder::HolderArgs {
            name,
            run_dir,
            shape: Shape { memory_mib, vcpus },
            server_pid,
        })),
    }
}

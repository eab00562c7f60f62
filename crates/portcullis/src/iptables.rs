//! `portcullis iptables`: the nat rules Istio's init container installs for outbound capture.

use std::process::ExitCode;

use clap::Args;

/// Flags of `portcullis iptables`.
#[derive(Args, Debug)]
pub struct IptablesArgs {
    /// Install the rules instead of printing them.
    #[arg(long)]
    pub apply: bool,
}

/// Prints or applies the rules.
pub fn run(args: &IptablesArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    Ok(ExitCode::SUCCESS)
}

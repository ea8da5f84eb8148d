use std::process::ExitCode;

use clap::Parser;
use ipvs_proxy::config::ProxyConfig;
use ipvs_proxy::flags::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Plan(plan)) => {
            let _config = ProxyConfig::default().with_flags(&plan.flags);
            eprintln!("ipvs-proxy plan: not implemented yet");
            ExitCode::FAILURE
        }
        None => {
            let _config = ProxyConfig::default().with_flags(&cli.flags);
            eprintln!("ipvs-proxy: the daemon is not implemented yet");
            ExitCode::FAILURE
        }
    }
}

use std::process::ExitCode;

use clap::Parser;
use ipvs_proxy::config::ProxyConfig;
use ipvs_proxy::flags::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Plan(plan)) => {
            let verbosity = plan.flags.verbosity.unwrap_or(0);
            let format = plan.flags.log_format.unwrap_or(LogFormat::Text);
            ipvs_proxy::logging::init(verbosity, format);
            ExitCode::from(ipvs_proxy::plan::run(
                &plan,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            ))
        }
        None => {
            let _config = ProxyConfig::default().with_flags(&cli.flags);
            eprintln!("ipvs-proxy: the daemon is not implemented yet");
            ExitCode::FAILURE
        }
    }
}

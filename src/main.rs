use std::process::ExitCode;

use clap::Parser;
use ipvs_proxy::config::ProxyConfig;
use ipvs_proxy::flags::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    ipvs_proxy::allocator::tune();
    let cli = Cli::parse();
    let flags = cli.command.as_ref().map_or(&cli.flags, |c| &c.args().flags);
    flags
        .deprecation_warnings()
        .iter()
        .for_each(|w| eprintln!("{w}"));
    if let Some(command) = &cli.command {
        let plan = command.args();
        let run = match command {
            Command::Plan(_) => ipvs_proxy::plan::run,
            Command::Check(_) => ipvs_proxy::check::run,
        };
        let verbosity = plan.flags.verbosity.unwrap_or(0);
        let format = plan.flags.log_format.unwrap_or(LogFormat::Text);
        ipvs_proxy::logging::init(verbosity, format);
        return ExitCode::from(run(
            plan,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ));
    }
    let (config, unknown) = match ProxyConfig::resolve(&cli.flags) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("ipvs-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    ipvs_proxy::logging::init(config.verbosity, config.log_format);
    for field in unknown {
        tracing::warn!(field, "unknown field in the --config file, ignored");
    }
    if let Some(path) = &cli.flags.write_config_to {
        let written = ipvs_proxy::config_file::write(path, &config);
        let failed = written.inspect_err(|e| tracing::error!("{e}")).is_err();
        return ExitCode::from(u8::from(failed));
    }
    config.log_not_acted_on();
    if cli.flags.init_only == Some(true) {
        ipvs_proxy::daemon::init_node(&config);
        return ExitCode::SUCCESS;
    }
    if config.cleanup {
        let report = ipvs_proxy::cleanup::cleanup(&config);
        tracing::info!(
            virtual_servers = report.virtual_servers,
            link_deleted = report.link_deleted,
            chains = report.chains,
            sets = report.sets,
            "cleanup done"
        );
        for error in &report.errors {
            tracing::error!("cleanup: {error}");
        }
        return if report.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match ipvs_proxy::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

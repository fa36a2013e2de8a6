//! `tonic-pool-tune`: measures a gRPC endpoint with N = 1, 2, 4, … connections per endpoint
//! and recommends `connections_per_endpoint` for a tonic-pool `Pool`.
//!
//! ```text
//! cargo run --release --features tune --bin tonic-pool-tune -- TARGET [options]
//! ```
//!
//! Progress goes to stderr; the table, any notes, the builder line to paste and, last, the
//! line `recommended connections_per_endpoint: N` go to stdout. Exit codes: 0 on success,
//! 1 when the sweep stopped (connect error, authentication, unknown method, …) or the plot
//! could not be written, 2 on a usage error. The work is in `tonic_pool::tune`.

use std::io::Write;
use std::process::ExitCode;

use tonic_pool::tune::{parse_args, run, Command, USAGE};

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("tonic-pool-tune: {err}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tonic-pool-tune: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(run(&options, &mut std::io::stderr())) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("tonic-pool-tune: {err}");
            return ExitCode::FAILURE;
        }
    };

    let mut out = std::io::stdout().lock();
    let mut failed = false;
    if let Some(path) = &options.plot {
        match std::fs::write(path, report.plot_svg()) {
            Ok(()) => eprintln!("plot written to {}", path.display()),
            Err(err) => {
                eprintln!(
                    "tonic-pool-tune: cannot write the plot to {}: {err}",
                    path.display()
                );
                failed = true;
            }
        }
    }
    // The contract: the recommendation is the last line, so the builder line comes before it.
    let _ = write!(out, "{}", report.table());
    for note in report.notes() {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "builder: {}", report.builder_line());
    let _ = writeln!(out, "{}", report.last_line());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

//! `cache-cli`: see `cache_cli` (crates/cache-cli) for the commands and exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = cache_cli::main_with(
        std::env::args_os(),
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(code)
}

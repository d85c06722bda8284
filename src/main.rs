//! `pdvault`: the server and the operator's CLI (see `cli`).

fn main() -> std::process::ExitCode {
    pdvault::cli::main()
}

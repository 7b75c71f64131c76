//! The `meshd` binary: see `meshd --help`.

fn main() -> std::process::ExitCode {
    meshd::cli::main()
}

//! The daemon under test: the same entry point as the `meshd` binary, built inside the
//! test package so integration tests can spawn it (and kill it with SIGKILL).

fn main() -> std::process::ExitCode {
    meshd::cli::main()
}

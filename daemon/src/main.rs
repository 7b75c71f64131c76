//! The `meshd` binary: see `meshd --help`.

// Every message allocates a few small buffers on several threads; glibc's allocator
// spent a fifth of the broker's CPU on that under load (see the README's benchmarks).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    meshd::cli::main()
}

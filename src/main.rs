//! `pdvault`: the server and the operator's CLI (see `cli`).

/// Every heap block is wiped when it is freed or moved by a reallocation, so
/// that a request's body, a decrypted field or a bearer token that some
/// library copied into a buffer of its own (hyper, rustls, serde) does not
/// linger in freed memory, where a core dump or a later bug could read it.
/// The price is one memset per free; see the README's core-dump figures.
/// Under the wipe, mimalloc: its per-thread free lists cost a fraction of
/// glibc's bins on the many small blocks of a request (README, Benchmarks).
#[global_allocator]
static ALLOC: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<mimalloc::MiMalloc> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(mimalloc::MiMalloc);

fn main() -> std::process::ExitCode {
    pdvault::cli::main()
}

//! `pdvault`: the server and the operator's CLI (see `cli`).

/// Every heap block is wiped when it is freed or moved by a reallocation, so
/// that a request's body, a decrypted field or a bearer token that some
/// library copied into a buffer of its own (hyper, rustls, serde) does not
/// linger in freed memory, where a core dump or a later bug could read it.
/// The price is one memset per free; see the README's core-dump figures.
#[global_allocator]
static ALLOC: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<std::alloc::System> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(std::alloc::System);

fn main() -> std::process::ExitCode {
    pdvault::cli::main()
}

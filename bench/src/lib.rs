//! par-imap against the peers a user would otherwise pick (rayon, pariter,
//! par-stream, hand-written `buffered` pipelines): the criterion benches in
//! `benches/` and `examples/compare.rs`. A workspace member of its own, so
//! that these heavy dependencies are never built for par-imap itself.
//!
//! This library is the CPU-bound workload they share, so both measure the
//! same thing.

use std::hint::black_box;

/// The most mapper calls at once: this machine's two cores.
pub const LIMIT: usize = 2;

/// `rounds` xorshift steps seeded by `seed`: pure CPU, no memory traffic.
pub fn work(seed: u64, rounds: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    black_box(x)
}

/// A multi-thread runtime with one worker per core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(LIMIT)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A rayon pool with one thread per core, as `runtime` has.
pub fn rayon_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(LIMIT)
        .build()
        .expect("a rayon pool")
}

/// The rayon peer: the whole input collected into a `Vec` first (rayon does
/// not stream), then a parallel map and sum on `pool`.
pub fn rayon_sum(pool: &rayon::ThreadPool, items: u64, rounds: u64) -> u64 {
    use rayon::prelude::*;
    let input: Vec<u64> = (0..items).collect();
    pool.install(|| {
        input
            .par_iter()
            .map(|&i| work(i, rounds))
            .reduce(|| 0, u64::wrapping_add)
    })
}

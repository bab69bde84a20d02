//! Criterion benches of par-imap against its peers, one group per target of
//! the performance issue. The runtime is built outside `b.iter`.
//!
//! `cargo bench -p par-imap-bench` runs them all; `examples/compare.rs` prints the same
//! comparisons as one table (see BENCHMARKS.md).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;

use par_imap_bench::{LIMIT, rayon_pool, rayon_sum, runtime, work};

/// Targets 1–3: CPU-bound items of three sizes (rounds of xorshift).
fn cpu(c: &mut Criterion) {
    let rt = runtime();
    let pool = rayon_pool();
    for (rounds, items, batch) in [
        (90_u64, 100_000_u64, 1024_usize),
        (9_500, 2_000, 16),
        (97_000, 200, 4),
    ] {
        let mut group = c.benchmark_group(format!("cpu/{rounds}-rounds"));
        group.throughput(Throughput::Elements(items));
        group.sample_size(10);
        group.bench_function("serial", |b| {
            b.iter(|| {
                (0..items)
                    .map(|i| work(i, rounds))
                    .fold(0, u64::wrapping_add)
            })
        });
        group.bench_function("rayon", |b| b.iter(|| rayon_sum(&pool, items, rounds)));
        group.bench_function("buffered_spawn_blocking", |b| {
            b.iter(|| {
                rt.block_on(
                    stream::iter(0..items)
                        .map(|i| tokio::task::spawn_blocking(move || work(i, rounds)))
                        .buffered(LIMIT)
                        .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
                )
            })
        });
        for k in [1, batch] {
            group.bench_with_input(BenchmarkId::new("par_imap_batch", k), &k, |b, &k| {
                b.iter(|| {
                    rt.block_on(
                        stream::iter(0..items)
                            .par_imap(LIMIT, move |i| work(i, rounds))
                            .batch(k)
                            .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
                    )
                })
            });
        }
        group.finish();
    }
}

/// Target 4: trivial futures, and 1 ms sleeps at limit 256.
fn async_calls(c: &mut Criterion) {
    let rt = runtime();
    let items = 20_000_u64;
    let mut group = c.benchmark_group("async/trivial");
    group.throughput(Throughput::Elements(items));
    group.bench_function("buffered_tokio_spawn", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .map(|i| tokio::spawn(async move { i }))
                    .buffered(64)
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.bench_function("par_imap_async", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap_async(64, |i| async move { i })
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.finish();

    let sleeps = 5_000_u64;
    let mut group = c.benchmark_group("async/sleep-1ms-limit-256");
    group.throughput(Throughput::Elements(sleeps));
    group.sample_size(10);
    group.bench_function("buffered_in_task", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..sleeps)
                    .map(|_| tokio::time::sleep(Duration::from_millis(1)))
                    .buffered(256)
                    .count(),
            )
        })
    });
    group.bench_function("par_imap_async", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..sleeps)
                    .par_imap_async(256, |_| tokio::time::sleep(Duration::from_millis(1)))
                    .count(),
            )
        })
    });
    group.finish();
}

/// Target 5: one item in 100 takes 50× longer.
fn skew(c: &mut Criterion) {
    let rt = runtime();
    let (rounds, items) = (12_000_u64, 2_000_u64);
    let cost = move |i: u64| if i % 100 == 0 { rounds * 50 } else { rounds };
    let mut group = c.benchmark_group("skew");
    group.throughput(Throughput::Elements(items));
    group.sample_size(10);
    group.bench_function("ordered_window_16x", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap(LIMIT, move |i| work(i, cost(i)))
                    .window(16 * LIMIT)
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.bench_function("unordered", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap_unordered(LIMIT, move |i| work(i, cost(i)))
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.finish();
}

/// Target 6: 1 KiB outputs stream through in constant memory (the peak RSS
/// figures are in `examples/compare.rs`; this measures the throughput).
fn memory(c: &mut Criterion) {
    let rt = runtime();
    let items = 100_000_u64;
    let mut group = c.benchmark_group("kib-outputs");
    group.throughput(Throughput::Elements(items));
    group.sample_size(10);
    group.bench_function("par_imap_batch_64", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap(LIMIT, |i| vec![(i % 251) as u8; 1024])
                    .batch(64)
                    .try_fold(0_u64, |sum, kib| async move { Ok(sum + u64::from(kib[0])) }),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, cpu, async_calls, skew, memory);
criterion_main!(benches);

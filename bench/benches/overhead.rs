//! What the `tracing` feature costs when no subscriber listens: run this
//! bench with and without `--no-default-features` and compare.
//!
//! ```text
//! cargo bench -p par-imap-bench --bench overhead -- --save-baseline tracing-on
//! cargo bench -p par-imap-bench --bench overhead --no-default-features -- --baseline tracing-on
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::{TryStreamExt, stream};
use par_imap::ParImapExt;

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let items = 20_000_u64;
    let mut group = c.benchmark_group("overhead");
    group.throughput(Throughput::Elements(items));
    group.bench_function("blocking_trivial_items", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap(2, |n| n.wrapping_mul(3))
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.bench_function("async_trivial_futures", |b| {
        b.iter(|| {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap_async(64, |n| async move { n.wrapping_mul(3) })
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);

//! Soak: 10 million items through each of the four base variants, checking
//! the exact sum and that peak memory does not grow with the length.
//!
//! Ignored by default (minutes of CPU); `.ci/run` runs it when `SOAK=1`:
//! `cargo test --release --test soak -- --ignored`.

use futures::{TryStreamExt, stream};
use par_imap::ParImapExt;

const ITEMS: u64 = 10_000_000;

/// Peak resident memory of this process so far, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("a VmHWM line")
}

fn expected_sum(items: u64) -> u64 {
    (0..items)
        .map(|n| n.wrapping_mul(3))
        .fold(0, u64::wrapping_add)
}

async fn sum(items: u64, variant: usize) -> u64 {
    let add = |sum: u64, x: u64| async move { Ok::<_, par_imap::Error>(sum.wrapping_add(x)) };
    let input = stream::iter(0..items);
    match variant {
        0 => {
            input
                .par_imap(2, |n| n.wrapping_mul(3))
                .batch(256)
                .try_fold(0, add)
                .await
        }
        1 => {
            input
                .par_imap_unordered(2, |n| n.wrapping_mul(3))
                .batch(256)
                .try_fold(0, add)
                .await
        }
        2 => {
            input
                .par_imap_async(64, |n| async move { n.wrapping_mul(3) })
                .try_fold(0, add)
                .await
        }
        _ => {
            input
                .par_imap_async_unordered(64, |n| async move { n.wrapping_mul(3) })
                .try_fold(0, add)
                .await
        }
    }
    .expect("no failures in a soak")
}

#[test]
#[ignore = "minutes of CPU: run with SOAK=1 bash .ci/run, or --ignored"]
fn ten_million_items_through_each_variant_in_constant_memory() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    // Warm up every variant on a short run, so the baseline holds the
    // runtime's and the allocator's own footprint.
    for variant in 0..4 {
        assert_eq!(
            runtime.block_on(sum(100_000, variant)),
            expected_sum(100_000)
        );
    }
    let baseline = peak_rss_kib();
    let expected = expected_sum(ITEMS);
    for variant in 0..4 {
        assert_eq!(
            runtime.block_on(sum(ITEMS, variant)),
            expected,
            "variant {variant}"
        );
        let peak = peak_rss_kib();
        // Constant memory: 100× the items may not add more than 16 MiB.
        assert!(
            peak <= baseline + 16 * 1024,
            "variant {variant}: peak {peak} KiB, baseline {baseline} KiB"
        );
    }
}

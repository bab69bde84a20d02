//! par-imap side by side with the peers a user would otherwise pick, in one
//! process, printed as markdown tables (items per second, median of 3 runs).
//!
//! ```text
//! cargo run --release -p par-imap-bench --example compare            # everything, about 4 minutes
//! cargo run --release -p par-imap-bench --example compare -- quick   # fewer items, a smoke run
//! cargo run --release -p par-imap-bench --example compare -- keyed-async 7   # .key_order on async items
//! cargo run --release -p par-imap-bench --example compare -- cpu [PATH]      # the CPU table and its plot (target/compare-cpu.svg)
//! cargo run --release -p par-imap-bench --example compare -- skew-one ordered 32 even   # the skew workload alone: ordered WINDOW (0: default) | unordered 0, skew | even
//! cargo run --release -p par-imap-bench --example compare -- rayon-one 0.15 3000000   # rayon alone, beside `one`
//! ```
//!
//! CPU-bound work is a xorshift loop (no memory traffic), calibrated at start
//! to ~0.15 µs, ~1.6 µs, ~16 µs and ~165 µs per item; limit 2 (this
//! machine's cores); the consumer folds the results in `block_on`. The
//! defaults (`par_imap(2, f)`, nothing else) lead; tuned figures follow.

use std::hint::black_box;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;

use par_imap_bench::{LIMIT, rayon_pool, rayon_sum, runtime, work};

/// Where the plot of the CPU-bound table goes, unless `compare cpu PATH`.
const SVG: &str = "target/compare-cpu.svg";

/// Rounds of `work` that take about `micros` µs here.
fn calibrate(micros: f64) -> u64 {
    let rounds = 2_000_000;
    let start = Instant::now();
    black_box(work(1, rounds));
    let per_round = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    ((micros / per_round) as u64).max(1)
}

/// Median items/s of three runs of `run`, which maps `items` items and
/// returns a checksum (checked equal across runs and peers).
fn measure(items: u64, mut run: impl FnMut() -> u64) -> (f64, u64) {
    let mut rates = Vec::new();
    let mut checksum = 0;
    for _ in 0..3 {
        let start = Instant::now();
        checksum = run();
        rates.push(items as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    (rates[1], checksum)
}

fn rate(items_per_second: f64) -> String {
    if items_per_second >= 1e6 {
        format!("{:.2} M/s", items_per_second / 1e6)
    } else if items_per_second >= 1e3 {
        format!("{:.1} k/s", items_per_second / 1e3)
    } else {
        format!("{items_per_second:.0} /s")
    }
}

struct Row {
    name: &'static str,
    rates: Vec<f64>,
}

fn cpu_table(quick: bool, svg: &str) {
    let rt = runtime();
    let workloads: Vec<(&str, f64, u64, usize)> = vec![
        // (label, µs per item, items, batch of the tuned row)
        (
            "~0.15 µs",
            0.15,
            if quick { 200_000 } else { 2_000_000 },
            256,
        ),
        ("~1.6 µs", 1.6, if quick { 20_000 } else { 200_000 }, 256),
        ("~16 µs", 16.0, if quick { 2_000 } else { 20_000 }, 16),
        ("~165 µs", 165.0, if quick { 200 } else { 2_000 }, 16),
    ];
    let names = [
        "serial loop",
        "rayon par_iter (Vec)",
        "pariter",
        "par-stream par_map",
        "futures buffered (in-task)",
        "buffered over spawn_blocking",
        "**par_imap, defaults**",
        "par_imap + batch (tuned)",
    ];
    let mut rows: Vec<Row> = names
        .iter()
        .map(|name| Row {
            name,
            rates: Vec::new(),
        })
        .collect();
    for &(label, micros, items, batch) in &workloads {
        let rounds = calibrate(micros);
        eprintln!("{label}: {rounds} rounds per item, {items} items");
        let expected = (0..items)
            .map(|i| work(i, rounds))
            .fold(0, u64::wrapping_add);
        let mut results = Vec::new();
        results.push(measure(items, || {
            (0..items)
                .map(|i| work(i, rounds))
                .fold(0, u64::wrapping_add)
        }));
        let pool = rayon_pool();
        results.push(measure(items, || rayon_sum(&pool, items, rounds)));
        results.push(measure(items, || {
            use pariter::IteratorExt;
            (0..items)
                .parallel_map_custom(|o| o.threads(LIMIT), move |i| work(i, rounds))
                .fold(0, u64::wrapping_add)
        }));
        results.push(measure(items, || {
            use par_stream::prelude::*;
            // par-stream spawns its workers when the method is called.
            rt.block_on(async {
                stream::iter(0..items)
                    .par_map(LIMIT, move |i| move || work(i, rounds))
                    .fold(0_u64, |sum, x| async move { sum.wrapping_add(x) })
                    .await
            })
        }));
        results.push(measure(items, || {
            rt.block_on(
                stream::iter(0..items)
                    .map(|i| async move { work(i, rounds) })
                    .buffered(LIMIT)
                    .fold(0_u64, |sum, x| async move { sum.wrapping_add(x) }),
            )
        }));
        results.push(measure(items, || {
            rt.block_on(
                stream::iter(0..items)
                    .map(|i| tokio::task::spawn_blocking(move || work(i, rounds)))
                    .buffered(LIMIT)
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
            .expect("no panics")
        }));
        results.push(measure(items, || {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap(LIMIT, move |i| work(i, rounds))
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
            .expect("no panics")
        }));
        results.push(measure(items, || {
            rt.block_on(
                stream::iter(0..items)
                    .par_imap(LIMIT, move |i| work(i, rounds))
                    .batch(batch)
                    .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
            )
            .expect("no panics")
        }));
        for (row, (items_per_second, checksum)) in rows.iter_mut().zip(results) {
            assert_eq!(checksum, expected, "{} computed something else", row.name);
            row.rates.push(items_per_second);
        }
    }

    println!(
        "## CPU-bound map, limit {LIMIT}, items/s (median of 3), ratio to serial / to rayon\n"
    );
    print!("| peer |");
    for (label, ..) in &workloads {
        print!(" {label} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(workloads.len()));
    let serial = rows[0].rates.clone();
    let rayon = rows[1].rates.clone();
    for row in &rows {
        print!("| {} |", row.name);
        for (column, &value) in row.rates.iter().enumerate() {
            print!(
                " {} ({:.2}× serial, {:.2}× rayon) |",
                rate(value),
                value / serial[column],
                value / rayon[column]
            );
        }
        println!();
    }
    println!(
        "\n`par_imap, defaults` is `par_imap({LIMIT}, f)` and nothing else; the tuned row \
         adds `.batch(256)` at ~0.15 and ~1.6 µs, `.batch(16)` at ~16 and ~165 µs.\n"
    );
    let micros: Vec<f64> = workloads.iter().map(|&(_, micros, ..)| micros).collect();
    // The peers a reader compares: serial, rayon, pariter, par-stream, the
    // hand-written idiom and par_imap's defaults.
    let drawn: Vec<&Row> = [0, 1, 2, 3, 5, 6].iter().map(|&row| &rows[row]).collect();
    match std::fs::write(svg, speedup_svg(&micros, &drawn)) {
        Ok(()) => println!("The plot of these figures: `{svg}`.\n"),
        Err(error) => eprintln!("could not write {svg}: {error}"),
    }
}

/// An SVG of each row's speed-up over the serial loop (the first row)
/// against the work per item (log scale), written by hand: no plotting
/// crate for six polylines.
fn speedup_svg(micros: &[f64], rows: &[&Row]) -> String {
    use std::fmt::Write;
    let (width, height, left, right, top, bottom) = (720.0, 400.0, 56.0, 200.0, 40.0, 48.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let (low, high) = (micros[0].log10(), micros[micros.len() - 1].log10());
    let x = |m: f64| left + (m.log10() - low) / (high - low) * plot_w;
    let top_speedup = (LIMIT as f64 + 0.2).max(
        rows.iter()
            .flat_map(|row| row.rates.iter().zip(&rows[0].rates).map(|(r, s)| r / s))
            .fold(0.0, f64::max),
    );
    let y = |speedup: f64| top + plot_h - speedup / top_speedup * plot_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="20">Speed-up over a serial loop, limit {LIMIT} ({LIMIT} cores), against the work per item</text>"#
    );
    let (x0, y0, x1) = (left, top + plot_h, left + plot_w);
    let _ = writeln!(
        svg,
        r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{top}" stroke="black"/>"#
    );
    for &m in micros {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{m} µs</text>"#,
            x(m),
            y0 + 16.0
        );
    }
    let mut tick = 0.0;
    while tick <= top_speedup {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{tick:.1}×</text><line x1="{x0}" y1="{:.1}" x2="{x1}" y2="{:.1}" stroke="lightgray"/>"#,
            x0 - 6.0,
            y(tick) + 4.0,
            y(tick),
            y(tick)
        );
        tick += 0.5;
    }
    let colors = [
        "gray",
        "black",
        "darkorange",
        "seagreen",
        "purple",
        "steelblue",
    ];
    for (n, row) in rows.iter().enumerate() {
        let color = colors[n % colors.len()];
        let points: Vec<String> = micros
            .iter()
            .zip(row.rates.iter().zip(&rows[0].rates))
            .map(|(&m, (rate, serial))| format!("{:.1},{:.1}", x(m), y(rate / serial)))
            .collect();
        let stroke = if n + 1 == rows.len() { 3 } else { 2 };
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="{stroke}" points="{}"/>"#,
            points.join(" ")
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
            x1 + 10.0,
            top + 16.0 + 18.0 * n as f64,
            row.name.trim_matches('*')
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// 200 000 items of ~0.15 µs, then 300 of ~1.6 ms: the defaults must size
/// calls for the first phase and still spread the second over every worker.
fn phase_change_table(quick: bool) {
    let rt = runtime();
    let (fast, slow) = (calibrate(0.15), calibrate(1600.0));
    let (fast_items, slow_items) = if quick { (50_000, 100) } else { (200_000, 300) };
    let items = fast_items + slow_items;
    let cost = move |i: u64| if i < fast_items { fast } else { slow };
    let median = |run: &dyn Fn() -> u64| {
        let mut times: Vec<f64> = (0..3)
            .map(|_| {
                let start = Instant::now();
                black_box(run());
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[1]
    };
    let serial = median(&|| {
        (0..items)
            .map(|i| work(i, cost(i)))
            .fold(0, u64::wrapping_add)
    });
    let pool = rayon_pool();
    let rayon = median(&|| {
        use rayon::prelude::*;
        let input: Vec<u64> = (0..items).collect();
        pool.install(|| {
            input
                .par_iter()
                .map(|&i| work(i, cost(i)))
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    let ours = median(&|| {
        rt.block_on(
            stream::iter(0..items)
                .par_imap(LIMIT, move |i| work(i, cost(i)))
                .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }),
        )
        .expect("no panics")
    });
    let ideal = serial / LIMIT as f64;
    println!(
        "## Phase change: {fast_items} items of ~0.15 µs, then {slow_items} of ~1.6 ms, limit {LIMIT}\n"
    );
    println!("| | wall | / ideal (serial / {LIMIT}) |");
    println!("|---|---|---|");
    for (name, wall) in [
        ("serial loop", serial),
        ("rayon par_iter (Vec)", rayon),
        ("**par_imap, defaults**", ours),
    ] {
        println!("| {name} | {:.0} ms | {:.2} |", wall * 1e3, wall / ideal);
    }
    println!();
}

/// How long the first result of a map of ~10 ms items takes, against one
/// item's time: batching must not hold it back.
fn first_result_table() {
    let rt = runtime();
    let rounds = calibrate(10_000.0);
    let median = |run: &dyn Fn()| {
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                run();
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    let one = median(&|| {
        black_box(work(7, rounds));
    });
    // Each run drops its map with calls still running (a blocking call
    // cannot be stopped): the next one waits until they are done, so that
    // every run starts on idle cores, as a fresh map would.
    let first = {
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(100));
                let start = Instant::now();
                rt.block_on(async {
                    let mut results =
                        stream::iter(0..100_u64).par_imap(LIMIT, move |i| work(i, rounds));
                    black_box(results.next().await);
                });
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    println!("## First result on ~10 ms items, defaults, limit {LIMIT}\n");
    println!("| one item | first result of `par_imap` | ratio |");
    println!("|---|---|---|");
    println!(
        "| {:.1} ms | {:.1} ms | {:.2} |\n",
        one * 1e3,
        first * 1e3,
        first / one
    );
}

/// Items/s (median of 3) of `items` trivial futures, limit `limit`,
/// through `par_imap_async` (`ours`) or buffered over `tokio::spawn`, the
/// consumer folding them in a spawned task or in `block_on`.
fn async_rate(
    rt: &tokio::runtime::Runtime,
    items: u64,
    limit: usize,
    ours: bool,
    in_task: bool,
) -> f64 {
    measure(items, || {
        let fold = if ours {
            stream::iter(0..items)
                .par_imap_async(limit, |i| async move { i })
                .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) })
                .map(|sum| sum.expect("no panics"))
                .boxed()
        } else {
            stream::iter(0..items)
                .map(|i| tokio::spawn(async move { i }))
                .buffered(limit)
                .try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) })
                .map(|sum| sum.expect("no panics"))
                .boxed()
        };
        if in_task {
            rt.block_on(rt.spawn(fold)).expect("no panics")
        } else {
            rt.block_on(fold)
        }
    })
    .0
}

fn async_table(quick: bool) {
    let rt = runtime();
    let items = if quick { 20_000 } else { 200_000 };
    println!("## Async: trivial futures, items/s (median of 3)\n");
    println!("| limit | consumer | buffered over tokio::spawn | par_imap_async | ratio |");
    println!("|---|---|---|---|---|");
    for limit in [16, 64] {
        for in_task in [true, false] {
            let spawned = async_rate(&rt, items, limit, false, in_task);
            let ours = async_rate(&rt, items, limit, true, in_task);
            println!(
                "| {limit} | {} | {} | {} | {:.2}× |",
                if in_task { "spawned task" } else { "block_on" },
                rate(spawned),
                rate(ours),
                ours / spawned
            );
        }
    }

    let sleeps = if quick { 5_000 } else { 20_000 };
    let wall = |run: &dyn Fn() -> u64| {
        let mut times: Vec<Duration> = (0..3)
            .map(|_| {
                let start = Instant::now();
                assert_eq!(run(), sleeps);
                start.elapsed()
            })
            .collect();
        times.sort();
        times[1]
    };
    let buffered = wall(&|| {
        rt.block_on(
            stream::iter(0..sleeps)
                .map(|_| tokio::time::sleep(Duration::from_millis(1)))
                .buffered(256)
                .fold(0, |n, ()| async move { n + 1 }),
        )
    });
    let ours = wall(&|| {
        rt.block_on(
            stream::iter(0..sleeps)
                .par_imap_async(256, |_| tokio::time::sleep(Duration::from_millis(1)))
                .try_fold(0, |n, ()| async move { Ok(n + 1) }),
        )
        .expect("no panics")
    });
    println!(
        "\n{sleeps} futures sleeping 1 ms, limit 256: futures `buffered(256)` in-task {:.0} ms, \
         par_imap_async {:.0} ms: {:.2}× the wall time (ideal {} ms)\n",
        buffered.as_secs_f64() * 1e3,
        ours.as_secs_f64() * 1e3,
        ours.as_secs_f64() / buffered.as_secs_f64(),
        sleeps / 256
    );
}

/// The skew workload: `items` items of `rounds` (~20 µs), one in 100 50×
/// slower unless `even`; ordered with `window` (DESIGN's default when
/// `None`) or unordered. Items/s (median of 3) and the checksum.
fn skew_rate(
    rt: &tokio::runtime::Runtime,
    (items, rounds): (u64, u64),
    ordered: Option<Option<usize>>,
    even: bool,
) -> (f64, u64) {
    let cost = move |i: u64| {
        if !even && i % 100 == 0 {
            rounds * 50
        } else {
            rounds
        }
    };
    let fold = |sum: u64, x: u64| async move { Ok(sum.wrapping_add(x)) };
    measure(items, || {
        let input = stream::iter(0..items);
        let done = match ordered {
            Some(window) => {
                let map = input.par_imap(LIMIT, move |i| work(i, cost(i)));
                let map = match window {
                    Some(window) => map.window(window),
                    None => map,
                };
                rt.block_on(map.try_fold(0_u64, fold))
            }
            None => rt.block_on(
                input
                    .par_imap_unordered(LIMIT, move |i| work(i, cost(i)))
                    .try_fold(0_u64, fold),
            ),
        };
        done.expect("no panics")
    })
}

fn skew_table(quick: bool) {
    let rt = runtime();
    let work = (if quick { 2_000 } else { 20_000 }, calibrate(20.0));
    // One item in 100 takes 50× longer.
    let ordered = skew_rate(&rt, work, Some(Some(16 * LIMIT)), false);
    let unordered = skew_rate(&rt, work, None, false);
    assert_eq!(ordered.1, unordered.1);
    println!("## Skew: 1 item in 100 takes 50× longer (~20 µs / ~1 ms), limit {LIMIT}\n");
    println!("| par_imap, window 16 × limit | par_imap_unordered | ratio |");
    println!("|---|---|---|");
    println!(
        "| {} | {} | {:.2}× |\n",
        rate(ordered.0),
        rate(unordered.0),
        ordered.0 / unordered.0
    );
}

/// Peak RSS of this process, from /proc (Linux), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Child mode: maps `items` items to 1 KiB outputs and prints peak RSS.
fn memory_child(items: u64) {
    let rt = runtime();
    let total = rt
        .block_on(
            stream::iter(0..items)
                .par_imap(LIMIT, |i| vec![(i % 251) as u8; 1024])
                .batch(64)
                .try_fold(0_u64, |sum, kib| async move { Ok(sum + u64::from(kib[0])) }),
        )
        .expect("no panics");
    black_box(total);
    println!("{}", peak_rss_kib().unwrap_or(0));
}

fn memory_table(quick: bool) {
    let exe = std::env::current_exe().expect("own path");
    let peak = |items: u64| -> Option<u64> {
        let out = std::process::Command::new(&exe)
            .args(["memory-child", &items.to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    let (small, large) = (100_000, if quick { 1_000_000 } else { 10_000_000 });
    let (Some(small_kib), Some(large_kib)) = (peak(small), peak(large)) else {
        println!("## Memory\n\n(peak RSS unavailable: no /proc here)\n");
        return;
    };
    println!("## Memory: 1 KiB outputs, peak RSS (VmHWM) of a fresh process\n");
    println!("| items | peak RSS |");
    println!("|---|---|");
    println!("| {small} | {:.1} MiB |", small_kib as f64 / 1024.0);
    println!("| {large} | {:.1} MiB |", large_kib as f64 / 1024.0);
    println!(
        "\n{}× the items, {:+.1} MiB ({:+.1} %) of peak memory.\n",
        large / small,
        (large_kib as f64 - small_kib as f64) / 1024.0,
        (large_kib as f64 / small_kib as f64 - 1.0) * 100.0
    );
}

/// A deterministic stream of pseudo-random numbers (splitmix64).
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..1`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// One async key-order scenario: the key and the sleep of each item.
struct KeyedRun {
    keys: Vec<u64>,
    sleeps: Vec<Duration>,
    limit: usize,
}

impl KeyedRun {
    /// Seconds to map every item with `par_imap_async(limit)`, with or
    /// without `.key_order`.
    fn time(&self, rt: &tokio::runtime::Runtime, keyed: bool) -> f64 {
        let keys = self.keys.clone();
        let sleeps = self.sleeps.clone();
        let limit = self.limit;
        let start = Instant::now();
        rt.block_on(rt.spawn(async move {
            let items = stream::iter(keys.into_iter().zip(sleeps));
            let map = items.par_imap_async(limit, |(key, sleep)| async move {
                tokio::time::sleep(sleep).await;
                key
            });
            let map = if keyed {
                map.key_order(|&(key, _)| key)
            } else {
                map
            };
            map.try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) })
                .await
                .expect("no failures")
        }))
        .expect("no panics");
        start.elapsed().as_secs_f64()
    }

    /// Seconds of a serial loop over the items of `key`: what that key
    /// costs however the others run.
    fn serial(&self, rt: &tokio::runtime::Runtime, key: u64) -> f64 {
        let sleeps: Vec<Duration> = (0..self.keys.len())
            .filter(|&i| self.keys[i] == key)
            .map(|i| self.sleeps[i])
            .collect();
        let start = Instant::now();
        rt.block_on(rt.spawn(async move {
            for sleep in sleeps {
                tokio::time::sleep(sleep).await;
            }
        }))
        .expect("no panics");
        start.elapsed().as_secs_f64()
    }
}

/// Median and range of `values`, formatted.
fn spread(values: &mut [f64], unit: &str, scale: f64) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "{:.3}{unit} [{:.3}–{:.3}]",
        values[values.len() / 2] * scale,
        values[0] * scale,
        values[values.len() - 1] * scale
    )
}

/// `.key_order` on async items (issue 20's targets), `rounds` rounds, each
/// scenario's runs interleaved within a round.
fn keyed_async_table(rounds: usize) {
    let rt = runtime();
    let ms = Duration::from_millis(1);
    let mut draws = Draws(20);
    // 20 000 items of a 1 ms sleep, limit 32: 1 000 uniform keys, and
    // Zipf (s = 1) over 1 000 keys.
    let uniform = KeyedRun {
        keys: (0..20_000).map(|_| draws.next() % 1_000).collect(),
        sleeps: vec![ms; 20_000],
        limit: 32,
    };
    let harmonic: Vec<f64> = (1..=1_000)
        .scan(0.0, |sum, k| {
            *sum += 1.0 / k as f64;
            Some(*sum)
        })
        .collect();
    let total = harmonic[999];
    let zipf = KeyedRun {
        keys: (0..20_000)
            .map(|_| {
                let u = draws.unit() * total;
                harmonic.partition_point(|&c| c < u) as u64
            })
            .collect(),
        sleeps: vec![ms; 20_000],
        limit: 32,
    };
    // Overtaking: 10 keys in turn, key 0's items 50 times slower, limit 8.
    let overtake = KeyedRun {
        keys: (0..1_000).map(|i| i % 10).collect(),
        sleeps: (0..1_000)
            .map(|i| if i % 10 == 0 { 50 * ms } else { ms })
            .collect(),
        limit: 8,
    };
    // One key: a serial loop.
    let one = KeyedRun {
        keys: vec![7; 1_000],
        sleeps: vec![ms; 1_000],
        limit: 32,
    };
    let (mut u, mut z, mut o, mut s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("keyed-async: round {}", round + 1);
        // keyed / unkeyed
        u.push(uniform.time(&rt, false) / uniform.time(&rt, true));
        // bound / keyed: bound = max(unkeyed, the hottest key alone)
        let zipf_keyed = zipf.time(&rt, true);
        let bound = zipf.time(&rt, false).max(zipf.serial(&rt, 0));
        z.push(bound / zipf_keyed);
        let overtake_keyed = overtake.time(&rt, true);
        let ideal = overtake.time(&rt, false).max(overtake.serial(&rt, 0));
        o.push(ideal / overtake_keyed);
        let one_keyed = one.time(&rt, true);
        s.push(one.serial(&rt, 7) / one_keyed);
    }
    println!(
        "## `.key_order` on async items: speed against the bound, median of {rounds} [min–max]\n"
    );
    println!("| scenario | ratio (1.0 = the bound) | target |");
    println!("|---|---|---|");
    println!(
        "| 1 000 uniform keys, 20 000 × 1 ms, limit 32: unkeyed time / keyed time | {} | ≥ 0.9 |",
        spread(&mut u, "", 1.0)
    );
    println!(
        "| Zipf (s = 1) over 1 000 keys, same: max(unkeyed, hottest key serial) / keyed | {} | ≥ 0.9 |",
        spread(&mut z, "", 1.0)
    );
    println!(
        "| overtaking: 10 keys, key 0 50× slower (50 ms), 1 000 items, limit 8: max(unkeyed, key 0 serial) / keyed | {} | ≥ 0.8 |",
        spread(&mut o, "", 1.0)
    );
    println!(
        "| one key, 1 000 × 1 ms: serial loop / keyed | {} | ≥ 0.9 (within 10 %) |",
        spread(&mut s, "", 1.0)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, rounds] = args.as_slice()
        && mode == "keyed-async"
    {
        keyed_async_table(rounds.parse().expect("rounds"));
        return;
    }
    if let [mode, items] = args.as_slice()
        && mode == "memory-child"
    {
        memory_child(items.parse().expect("an item count"));
        return;
    }
    if let [mode, micros, items, batch, window] = args.as_slice()
        && mode == "one"
    {
        let window: usize = window.parse().expect("window");
        // Profiling aid: one par_imap run, nothing else.
        let (micros, items, batch): (f64, u64, usize) = (
            micros.parse().expect("µs"),
            items.parse().expect("items"),
            batch.parse().expect("batch"),
        );
        let rounds = calibrate(micros);
        // Batch and window 0: the defaults.
        let (rate_now, _) = measure(items, || {
            let mut map = stream::iter(0..items).par_imap(LIMIT, move |i| work(i, rounds));
            if batch > 0 {
                map = map.batch(batch);
            }
            if window > 0 {
                map = map.window(window);
            }
            runtime()
                .block_on(map.try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }))
                .expect("no panics")
        });
        println!("{}", rate(rate_now));
        return;
    }
    if let [mode, micros, items, keys] = args.as_slice()
        && mode == "keyed"
    {
        // `.key_order` with the defaults: every item its own key
        // (`distinct`), `N` keys in turn, or `none` (no `.key_order`, the
        // same map), for the cost of keeping keys apart.
        let (micros, items): (f64, u64) =
            (micros.parse().expect("µs"), items.parse().expect("items"));
        let rounds = calibrate(micros);
        let keys = keys.clone();
        let (rate_now, _) = measure(items, || {
            let map = stream::iter(0..items).par_imap(LIMIT, move |i| work(i, rounds));
            let map = match keys.as_str() {
                "none" => map,
                "distinct" => map.key_order(|&i| i),
                n => {
                    let n: u64 = n.parse().expect("a key count");
                    map.key_order(move |&i| i % n)
                }
            };
            runtime()
                .block_on(map.try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }))
                .expect("no panics")
        });
        println!("{}", rate(rate_now));
        return;
    }
    if let [mode, items, which, rest @ ..] = args.as_slice()
        && mode == "async-one"
    {
        // Profiling aid: trivial futures through par_imap_async (`ours`) or
        // buffered over tokio::spawn; limit 64 unless given; the consumer in
        // a spawned task, or in `block_on` with `block_on` after the limit.
        let items: u64 = items.parse().expect("items");
        let limit = rest
            .first()
            .map_or(64, |limit| limit.parse().expect("limit"));
        let in_task = rest.get(1).is_none_or(|consumer| consumer != "block_on");
        let rt = runtime();
        println!(
            "{}",
            rate(async_rate(&rt, items, limit, which == "ours", in_task))
        );
        return;
    }
    if let [mode, timeout] = args.as_slice()
        && mode == "slow-tail"
    {
        // Items turn slow mid-stream: 20 000 of ~0.15 µs, then 400 of
        // ~1.1 ms, with the defaults, with or without a `.timeout(60 s)`
        // that never fires. Prints the wall time of the whole run in ms.
        let (fast, slow) = (calibrate(0.15), calibrate(1100.0));
        let items = 20_400_u64;
        let start = Instant::now();
        let map = stream::iter(0..items).par_imap(LIMIT, move |i| {
            work(i, if i < 20_000 { fast } else { slow })
        });
        let map = if timeout == "timeout" {
            map.timeout(Duration::from_secs(60))
        } else {
            map
        };
        runtime()
            .block_on(map.try_fold(0_u64, |sum, x| async move { Ok(sum.wrapping_add(x)) }))
            .expect("no panics");
        println!("{:.1}", start.elapsed().as_secs_f64() * 1e3);
        return;
    }
    if let [mode, which, window, slow] = args.as_slice()
        && mode == "skew-one"
    {
        // Profiling aid: the skew workload alone, `ordered` at a window
        // (0: the default) or `unordered`, with one slow item in 100
        // (`skew`) or none (`even`).
        let window: usize = window.parse().expect("window");
        let ordered = (which == "ordered").then_some((window > 0).then_some(window));
        let (rate_now, _) = skew_rate(
            &runtime(),
            (20_000, calibrate(20.0)),
            ordered,
            slow == "even",
        );
        println!("{}", rate(rate_now));
        return;
    }
    if let [mode, micros, items] = args.as_slice()
        && mode == "rayon-one"
    {
        // Profiling aid: rayon alone, to set beside `one` round by round.
        let (micros, items): (f64, u64) =
            (micros.parse().expect("µs"), items.parse().expect("items"));
        let rounds = calibrate(micros);
        let pool = rayon_pool();
        let (rate_now, _) = measure(items, || rayon_sum(&pool, items, rounds));
        println!("{}", rate(rate_now));
        return;
    }
    if let [mode, rest @ ..] = args.as_slice()
        && mode == "cpu"
    {
        // The CPU-bound table alone, and its plot (default path below).
        cpu_table(false, rest.first().map_or(SVG, String::as_str));
        return;
    }
    if args.first().is_some_and(|arg| arg == "first") {
        first_result_table();
        return;
    }
    if args.first().is_some_and(|arg| arg == "skew") {
        skew_table(false);
        return;
    }
    if args.first().is_some_and(|arg| arg == "async") {
        async_table(false);
        return;
    }
    let quick = args.first().is_some_and(|arg| arg == "quick");
    let start = Instant::now();
    cpu_table(quick, SVG);
    phase_change_table(quick);
    async_table(quick);
    first_result_table();
    skew_table(quick);
    memory_table(quick);
    eprintln!("done in {:.0} s", start.elapsed().as_secs_f64());
}

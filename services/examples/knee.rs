//! Where is the knee? Fixed limits of `par_imap_async` against a server that
//! serves at most C requests at once (the knee server of
//! `par_imap_services::knee`, 10 ms per request), then what happens when C
//! drops mid-run.
//!
//! ```text
//! cargo run --release -p par-imap-services --example knee -- [options]
//!
//!   --seconds S        measured seconds per run (default 3)
//!   --warmup S         seconds run before measuring, not counted (default 0.5)
//!   --limits L,L,..    fixed limits to sweep (default 1,2,4,8,16,32,64,128,256)
//!   --capacity C       the server's capacity C (default 32)
//!   --service-ms MS    the server's service time (default 10)
//!   --timeout-ms MS    par_imap's per-request timeout (default 200)
//!   --drop-limit L     the limit of the drop run (default 32)
//!   --drop-to C        the capacity C drops to (default 8)
//!   --drop-at S        when, in measured seconds (default 5)
//!   --drop-seconds S   measured seconds of the drop run (default 15)
//!   --adaptive-max M   also run `.adaptive_limit(M)` from limit 1, in the
//!                      sweep and the drop (default 256; 0: fixed only)
//!   --only sweep|drop  run one scenario only
//!   --csv PATH         per-1 s-window series (default target/knee.csv)
//!   --svg PATH         the adaptive limit over time in the drop run, with
//!                      C beside it (default target/knee-limit.svg)
//! ```
//!
//! The sweep prints one markdown row per limit: throughput, p50 and p99
//! latency over the run, the max and the median of the p99s of its 1 s
//! windows, timeouts, errors, and the process's CPU use (client and server
//! share the process; 100 % is one core). The best fixed limit (highest
//! throughput; within 2 % of it, the lowest p99) is marked, and the
//! adaptive row is set against it. The drop run (the fixed drop limit, then
//! the adaptive map) prints per-window throughput, p99 and the limit, so
//! recovery can be seen, and draws the adaptive limit over time as an SVG.
//!
//! Latency is per request, from the moment the mapper is called to the end
//! of the response body. A timed-out request counts in the percentiles with
//! the timeout as its latency (a lower bound of what it would have taken),
//! so timing out never makes a p99 look better.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use par_imap::ParImapExt;
use par_imap_services::knee::KneeServer;

/// How the map's concurrency is set: the one thing that changes between runs.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `par_imap_async(limit, ..)`.
    Fixed(usize),
    /// `par_imap_async(1, ..).adaptive_limit(max)`.
    Adaptive(usize),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Fixed(limit) => format!("fixed {limit}"),
            Mode::Adaptive(max) => format!("adaptive {max}"),
        }
    }
}

/// One answered request: when it ended and how long it took, both measured
/// in the mapper.
#[derive(Clone, Copy, Debug)]
struct Sample {
    end: Instant,
    latency: Duration,
}

type Outcome = Result<Result<Sample, reqwest::Error>, par_imap::Error>;

/// The map under test: an endless stream of requests, one shared client,
/// `timeout` per request, going on past timeouts. The only place that
/// depends on `mode`.
fn build_map(
    mode: Mode,
    client: reqwest::Client,
    url: String,
    timeout: Duration,
) -> (BoxStream<'static, Outcome>, par_imap::Stats) {
    let request = move |i: u64| {
        let started = Instant::now();
        let sent = client.get(format!("{url}item/{i}")).send();
        async move {
            sent.await?.error_for_status()?.bytes().await?;
            Ok(Sample {
                end: Instant::now(),
                latency: started.elapsed(),
            })
        }
    };
    let (limit, adaptive) = match mode {
        Mode::Fixed(limit) => (limit, None),
        Mode::Adaptive(max) => (1, Some(max)),
    };
    let mut map = futures::stream::iter(0..)
        .par_imap_async(limit, request)
        .timeout(timeout)
        .keep_going();
    if let Some(max) = adaptive {
        map = map.adaptive_limit(max);
    }
    let stats = map.stats();
    (map.boxed(), stats)
}

#[derive(Clone, Debug)]
struct Options {
    seconds: f64,
    warmup: f64,
    limits: Vec<usize>,
    capacity: usize,
    service: Duration,
    timeout: Duration,
    drop_limit: usize,
    drop_to: usize,
    drop_at: f64,
    drop_seconds: f64,
    /// `.adaptive_limit(max)` beside the fixed limits (0: none).
    adaptive_max: usize,
    only: Option<String>,
    csv: String,
    svg: String,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut options = Options {
            seconds: 3.0,
            warmup: 0.5,
            limits: vec![1, 2, 4, 8, 16, 32, 64, 128, 256],
            capacity: 32,
            service: KneeServer::SERVICE_TIME,
            timeout: Duration::from_millis(200),
            drop_limit: 32,
            drop_to: 8,
            drop_at: 5.0,
            drop_seconds: 15.0,
            adaptive_max: 256,
            only: None,
            csv: "target/knee.csv".into(),
            svg: "target/knee-limit.svg".into(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
            match flag.as_str() {
                "--seconds" => options.seconds = value.parse()?,
                "--warmup" => options.warmup = value.parse()?,
                "--limits" => {
                    options.limits = value.split(',').map(str::parse).collect::<Result<_, _>>()?
                }
                "--capacity" => options.capacity = value.parse()?,
                "--service-ms" => options.service = Duration::from_millis(value.parse()?),
                "--timeout-ms" => options.timeout = Duration::from_millis(value.parse()?),
                "--drop-limit" => options.drop_limit = value.parse()?,
                "--drop-to" => options.drop_to = value.parse()?,
                "--drop-at" => options.drop_at = value.parse()?,
                "--drop-seconds" => options.drop_seconds = value.parse()?,
                "--adaptive-max" => options.adaptive_max = value.parse()?,
                "--only" => options.only = Some(value),
                "--csv" => options.csv = value,
                "--svg" => options.svg = value,
                _ => anyhow::bail!("unknown option {flag} (see the doc comment of knee.rs)"),
            }
        }
        Ok(options)
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == scenario)
    }
}

/// What one run saw, times in seconds since the end of its warmup.
#[derive(Debug, Default)]
struct Run {
    /// (end, latency) of every answered request.
    answered: Vec<(f64, Duration)>,
    /// When each timeout was yielded.
    timeouts: Vec<f64>,
    /// How many requests failed otherwise (HTTP or connection errors).
    errors: usize,
    /// At the end of each 1 s window: calls in flight and the server's C.
    ticks: Vec<(u64, usize)>,
    /// Every 100 ms: (seconds, `Snapshot::limit`, the server's C).
    limits: Vec<(f64, u64, usize)>,
    /// Process CPU seconds over wall seconds, measured part only.
    cpu: Option<f64>,
    seconds: f64,
}

/// Runs `mode` for `warmup + seconds`, with `at(t, server)` called once when
/// `t` measured seconds have passed (the drop scenario's capacity change).
async fn run(
    mode: Mode,
    server: &Arc<KneeServer>,
    client: &reqwest::Client,
    options: &Options,
    seconds: f64,
    change: Option<(f64, usize)>,
) -> Run {
    let (mut results, stats) = build_map(mode, client.clone(), server.url(), options.timeout);
    let start = Instant::now() + Duration::from_secs_f64(options.warmup);
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let stop = tokio::time::sleep_until((start + Duration::from_secs_f64(seconds)).into());
    tokio::pin!(stop);
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let changer = change.map(|(at, capacity)| {
        let server = Arc::clone(server);
        tokio::spawn(async move {
            tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
            server.set_capacity(capacity);
        })
    });
    let mut sample = tokio::time::interval(Duration::from_millis(100));
    let mut cpu_start = None;
    let mut seen = Run {
        seconds,
        ..Run::default()
    };
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            _ = tick.tick() => {
                seen.ticks.push((stats.snapshot().in_flight, server.capacity()));
            }
            at = sample.tick() => {
                let t = since(at.into_std());
                if at.into_std() >= start {
                    seen.limits.push((t, stats.snapshot().limit, server.capacity()));
                }
            }
            () = tokio::time::sleep_until(start.into()), if cpu_start.is_none() => {
                cpu_start = cpu_seconds();
            }
            outcome = results.next() => match outcome {
                Some(Ok(Ok(sample))) => {
                    if sample.end >= start {
                        seen.answered.push((since(sample.end), sample.latency));
                    }
                }
                Some(Ok(Err(_))) => seen.errors += 1,
                Some(Err(error)) if error.is_timeout() => {
                    let now = Instant::now();
                    if now >= start {
                        seen.timeouts.push(since(now));
                    }
                }
                Some(Err(error)) => panic!("the map failed: {error}"),
                None => unreachable!("the input never ends"),
            },
        }
    }
    // The last window ends with `stop`, which wins the race with its tick.
    if seen.ticks.len() < seconds.floor() as usize {
        seen.ticks
            .push((stats.snapshot().in_flight, server.capacity()));
    }
    if let (Some(before), Some(after)) = (cpu_start, cpu_seconds()) {
        seen.cpu = Some((after - before) / seconds);
    }
    drop(results);
    if let Some(changer) = changer {
        changer.abort();
    }
    // Let aborted requests leave the server before the next run.
    let drained = Instant::now();
    while (server.running(), server.queued()) != (0, 0) {
        if drained.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "warning: {} running, {} queued 10 s after the run",
                server.running(),
                server.queued()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen
}

/// This process's user + system CPU time, from `/proc/self/stat` (Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// Nearest-rank percentile in milliseconds; `sorted` ascending.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One 1 s window of a run.
#[derive(Debug)]
struct Window {
    start: usize,
    answered: usize,
    timeouts: usize,
    p50: f64,
    p99: f64,
}

impl Run {
    /// Latencies of answered and timed-out requests in `[from, to)` seconds,
    /// sorted; a timeout counts as `timeout`.
    fn latencies(&self, from: f64, to: f64, timeout: Duration) -> Vec<Duration> {
        let within = |t: f64| (from..to).contains(&t);
        let mut latencies: Vec<Duration> = self
            .answered
            .iter()
            .filter(|(end, _)| within(*end))
            .map(|&(_, latency)| latency)
            .chain(
                self.timeouts
                    .iter()
                    .filter(|t| within(**t))
                    .map(|_| timeout),
            )
            .collect();
        latencies.sort_unstable();
        latencies
    }

    fn windows(&self, timeout: Duration) -> Vec<Window> {
        (0..self.seconds.floor() as usize)
            .map(|start| {
                let (from, to) = (start as f64, start as f64 + 1.0);
                let latencies = self.latencies(from, to, timeout);
                let timeouts = self
                    .timeouts
                    .iter()
                    .filter(|t| (from..to).contains(*t))
                    .count();
                Window {
                    start,
                    answered: latencies.len() - timeouts,
                    timeouts,
                    p50: percentile(&latencies, 50.0),
                    p99: percentile(&latencies, 99.0),
                }
            })
            .collect()
    }
}

/// A sweep row.
#[derive(Debug)]
struct Row {
    mode: Mode,
    throughput: f64,
    p50: f64,
    p99: f64,
    window_p99_max: f64,
    window_p99_median: f64,
    timeouts: usize,
    errors: usize,
    cpu: Option<f64>,
}

fn row(mode: Mode, run: &Run, timeout: Duration) -> Row {
    let latencies = run.latencies(0.0, run.seconds, timeout);
    let mut window_p99s: Vec<f64> = run.windows(timeout).iter().map(|w| w.p99).collect();
    Row {
        mode,
        throughput: run.answered.len() as f64 / run.seconds,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        window_p99_max: window_p99s.iter().copied().fold(f64::NAN, f64::max),
        window_p99_median: median(&mut window_p99s),
        timeouts: run.timeouts.len(),
        errors: run.errors,
        cpu: run.cpu,
    }
}

/// The best fixed limit: the highest throughput; every row within 2 % of
/// it ties, and the tie goes to the lowest p99.
fn best(rows: &[Row]) -> Option<usize> {
    let top = rows.iter().map(|r| r.throughput).fold(0.0, f64::max);
    (0..rows.len())
        .filter(|&i| rows[i].throughput >= 0.98 * top)
        .min_by(|&a, &b| rows[a].p99.total_cmp(&rows[b].p99))
}

fn csv_rows(csv: &mut String, scenario: &str, mode: Mode, run: &Run, timeout: Duration) {
    for window in run.windows(timeout) {
        let (in_flight, capacity) = run.ticks.get(window.start).copied().unwrap_or_default();
        let _ = writeln!(
            csv,
            "{scenario},{},{},{},{},{:.3},{:.3},{},{},{in_flight}",
            mode.name(),
            window.start,
            capacity,
            window.answered,
            window.p50,
            window.p99,
            window.timeouts,
            run.errors,
        );
    }
}

fn cpu(cpu: Option<f64>) -> String {
    cpu.map_or("-".into(), |c| format!("{:.0} %", c * 100.0))
}

/// The limit over time in a run (and the server's C), as an SVG line chart
/// drawn by hand: no plotting dependency for two lines.
fn svg(run: &Run, options: &Options, mode: Mode) -> String {
    let (width, height, pad) = (720.0, 360.0, 48.0);
    let top = run
        .limits
        .iter()
        .map(|&(_, limit, capacity)| limit.max(capacity as u64))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let x = |t: f64| pad + t / run.seconds * (width - 2.0 * pad);
    let y = |v: f64| height - pad - v / top * (height - 2.0 * pad);
    let line = |value: &dyn Fn(&(f64, u64, usize)) -> f64| -> String {
        run.limits
            .iter()
            .map(|point| format!("{:.1},{:.1}", x(point.0), y(value(point))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">{}: the limit over time; the server's capacity C drops from {} to {} at {} s</text>\n",
        mode.name(),
        options.capacity,
        options.drop_to,
        options.drop_at
    );
    let (x0, y0, x1, y1) = (x(0.0), y(0.0), x(run.seconds), y(top));
    let _ = writeln!(
        svg,
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\n\
         <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>"
    );
    for second in (0..=run.seconds as usize).step_by(5) {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{second} s</text>",
            x(second as f64),
            y0 + 16.0
        );
    }
    let step = (top / 5.0).ceil().max(1.0);
    let mut value = 0.0;
    while value <= top {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{value:.0}</text>",
            x0 - 6.0,
            y(value) + 4.0
        );
        value += step;
    }
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"gray\" stroke-dasharray=\"4 3\" points=\"{}\"/>\n\
         <polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n\
         <text x=\"{:.1}\" y=\"40\" fill=\"steelblue\">Snapshot::limit</text>\n\
         <text x=\"{:.1}\" y=\"56\" fill=\"gray\">capacity C</text>\n</svg>",
        line(&|point| point.2 as f64),
        line(&|point| point.1 as f64),
        width - 160.0,
        width - 160.0,
    );
    svg
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    let server = Arc::new(KneeServer::start(options.capacity, options.service).await?);
    let client = reqwest::Client::new();
    let mut csv = String::from(
        "scenario,mode,window_s,capacity,throughput,p50_ms,p99_ms,timeouts,errors_in_run,in_flight\n",
    );
    println!(
        "knee server: C = {}, {:?} per request, timeout {:?}, {} s per run after {} s warmup, {} worker threads\n",
        options.capacity,
        options.service,
        options.timeout,
        options.seconds,
        options.warmup,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );

    if options.runs("sweep") {
        let mut rows = Vec::new();
        let adaptive = (options.adaptive_max > 0).then_some(Mode::Adaptive(options.adaptive_max));
        let modes: Vec<Mode> = options
            .limits
            .iter()
            .map(|&l| Mode::Fixed(l))
            .chain(adaptive)
            .collect();
        for &mode in &modes {
            let seen = run(mode, &server, &client, &options, options.seconds, None).await;
            csv_rows(&mut csv, "sweep", mode, &seen, options.timeout);
            let row = row(mode, &seen, options.timeout);
            eprintln!(
                "{}: {:.0} req/s, p99 {:.1} ms",
                mode.name(),
                row.throughput,
                row.p99
            );
            rows.push(row);
        }
        let fixed = rows.len() - usize::from(adaptive.is_some());
        let best = best(&rows[..fixed]);
        println!("\nSweep against C = {}:\n", options.capacity);
        println!(
            "| mode | req/s | p50 ms | p99 ms | p99/1 s max | p99/1 s median | timeouts | errors | CPU | |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for (i, r) in rows.iter().enumerate() {
            println!(
                "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                r.mode.name(),
                r.throughput,
                r.p50,
                r.p99,
                r.window_p99_max,
                r.window_p99_median,
                r.timeouts,
                r.errors,
                cpu(r.cpu),
                if Some(i) == best { "**best**" } else { "" },
            );
        }
        if let (Some(best), Some(adaptive)) = (best, rows.get(fixed)) {
            println!(
                "\n{} against the best fixed limit ({}): throughput {:.3}x, p99 {:.2}x, median 1 s p99 {:.2}x",
                adaptive.mode.name(),
                rows[best].mode.name(),
                adaptive.throughput / rows[best].throughput,
                adaptive.p99 / rows[best].p99,
                adaptive.window_p99_median / rows[best].window_p99_median,
            );
        }
    }

    let drop_modes: Vec<Mode> = std::iter::once(Mode::Fixed(options.drop_limit))
        .chain((options.adaptive_max > 0).then_some(Mode::Adaptive(options.adaptive_max)))
        .collect();
    for mode in drop_modes.into_iter().filter(|_| options.runs("drop")) {
        server.set_capacity(options.capacity);
        let seen = run(
            mode,
            &server,
            &client,
            &options,
            options.drop_seconds,
            Some((options.drop_at, options.drop_to)),
        )
        .await;
        server.set_capacity(options.capacity);
        csv_rows(&mut csv, "drop", mode, &seen, options.timeout);
        println!(
            "\nDrop: {}, C = {} -> {} at {} s (CPU {}):\n",
            mode.name(),
            options.capacity,
            options.drop_to,
            options.drop_at,
            cpu(seen.cpu)
        );
        println!(
            "| window s | C at end | req/s | p50 ms | p99 ms | timeouts | in flight at end | limit (median) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for window in seen.windows(options.timeout) {
            let (in_flight, capacity) = seen.ticks.get(window.start).copied().unwrap_or_default();
            let mut limits: Vec<f64> = seen
                .limits
                .iter()
                .filter(|(t, _, _)| (window.start as f64..window.start as f64 + 1.0).contains(t))
                .map(|&(_, limit, _)| limit as f64)
                .collect();
            println!(
                "| {}-{} | {capacity} | {} | {:.1} | {:.1} | {} | {in_flight} | {:.0} |",
                window.start,
                window.start + 1,
                window.answered,
                window.p50,
                window.p99,
                window.timeouts,
                median(&mut limits),
            );
        }
        if let Mode::Adaptive(_) = mode {
            if let Some(dir) = std::path::Path::new(&options.svg).parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&options.svg, svg(&seen, &options, mode))?;
            println!("\nthe limit over time: {}", options.svg);
        }
    }

    if let Some(dir) = std::path::Path::new(&options.csv).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&options.csv, csv)?;
    println!("\nper-window series: {}", options.csv);
    if let Ok(server) = Arc::try_unwrap(server) {
        server.shutdown().await?;
    }
    Ok(())
}

//! Scratch (not committed): can a pool of long-lived tasks beat buffered-over-spawn?
use futures::{StreamExt, TryStreamExt, stream};
use std::collections::VecDeque;
use std::time::Instant;
use tokio::sync::mpsc;

async fn pool_map(items: u64, limit: usize) -> u64 {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, u64, usize)>();
    let mut workers: Vec<mpsc::UnboundedSender<(usize, u64)>> = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    let mut ring: VecDeque<Option<u64>> = VecDeque::new();
    let mut next_out = 0usize;
    let mut next_in = 0usize;
    let mut input = 0..items;
    let mut sum = 0u64;
    let mut running = 0usize;
    let mut input_done = false;
    loop {
        // start while room
        while running < limit && !input_done {
            match input.next() {
                Some(i) => {
                    let w = match idle.pop() {
                        Some(w) => w,
                        None => {
                            let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64)>();
                            let done = done_tx.clone();
                            let id = workers.len();
                            tokio::spawn(async move {
                                while let Some((idx, item)) = rx.recv().await {
                                    let out = async move { item }.await;
                                    if done.send((idx, out, id)).is_err() {
                                        break;
                                    }
                                }
                            });
                            workers.push(tx);
                            id
                        }
                    };
                    let _ = workers[w].send((next_in, i));
                    ring.push_back(None);
                    next_in += 1;
                    running += 1;
                }
                None => input_done = true,
            }
        }
        if let Some(Some(_)) = ring.front() {
            let v = ring.pop_front().unwrap().unwrap();
            next_out += 1;
            sum = sum.wrapping_add(v);
            continue;
        }
        if input_done && running == 0 && ring.is_empty() {
            return sum;
        }
        let (idx, out, w) = done_rx.recv().await.unwrap();
        ring[idx - next_out] = Some(out);
        idle.push(w);
        running -= 1;
        while let Ok((idx, out, w)) = done_rx.try_recv() {
            ring[idx - next_out] = Some(out);
            idle.push(w);
            running -= 1;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let items: u64 = args[1].parse().unwrap();
    let limit: usize = args[2].parse().unwrap();
    let which = args[3].clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rates = vec![];
    for _ in 0..3 {
        let start = Instant::now();
        let w = which.clone();
        let sum = rt
            .block_on(rt.spawn(async move {
                if w == "pool" {
                    pool_map(items, limit).await
                } else {
                    stream::iter(0..items)
                        .map(|i| tokio::spawn(async move { i }))
                        .buffered(limit)
                        .try_fold(0_u64, |s, x| async move { Ok(s.wrapping_add(x)) })
                        .await
                        .unwrap()
                }
            }))
            .unwrap();
        assert_eq!(sum, (0..items).sum::<u64>());
        rates.push(items as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!("{which} limit {limit}: {:.0} k/s", rates[1] / 1e3);
}

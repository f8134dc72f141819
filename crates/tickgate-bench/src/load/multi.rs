//! `--processes P`: the subscriber side spread over P child processes, so more
//! subscribers than one process's open-file limit (and more than one core's worth of
//! decoding) can run. The parent re-executes its own binary with the same arguments plus
//! `--child I/P`; child I takes its share of `--connections` and its own slice of the
//! 127.0.0.x source addresses.
//!
//! The children report on stderr with lines that start with [`TAG`]: `ready` after
//! connecting, `measuring` when their window opens, `progress` every second, `done` when it
//! closes. The parent waits until every child is ready, reads the server's memory, answers
//! `go` on every child's stdin (so all windows open together), reads the server's CPU when
//! all are measuring and again when all are done, prints one progress line a second, and
//! merges the children's JSON summaries: sums, and the latency histograms merged exactly
//! (each child serializes its HdrHistogram, V2 format).

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{decode_histogram, new_histogram, LoadError, LoadSummary, ServerProbe};

/// Prefix of the machine-readable lines a child writes on stderr.
pub const TAG: &str = "@tickgate-load";

/// Flags the parent keeps to itself (the children must not read the server's counters:
/// each would divide the whole server's CPU by its own share of the records).
const PARENT_ONLY: &[&str] = &["--processes", "--admin", "--server-pid"];

/// The share of `total` subscribers that child `index` of `processes` takes, and the
/// global index of its first subscriber.
pub fn share(total: usize, processes: usize, index: usize) -> (usize, usize) {
    let p = processes.max(1);
    let base = total / p;
    let extra = total % p;
    let count = base + usize::from(index < extra);
    let first = index * base + index.min(extra);
    (count, first)
}

/// The slice of source addresses of child `index`: (first last-octet, count).
pub fn ip_slice(source_ips: u8, processes: usize, index: usize) -> (u8, u8) {
    let per = (source_ips as usize / processes.max(1)).max(1);
    let first = (index * per) % 254 + 1;
    (first as u8, per.min(254 - first + 1) as u8)
}

/// The command line of a child: the parent's arguments without the parent-only flags.
pub fn child_args(argv: &[String], index: usize, processes: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len() + 2);
    let mut skip_value = false;
    for a in argv {
        if skip_value {
            skip_value = false;
            continue;
        }
        if PARENT_ONLY.contains(&a.as_str()) {
            skip_value = true;
            continue;
        }
        if PARENT_ONLY.iter().any(|f| a.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a.clone());
    }
    out.push("--child".into());
    out.push(format!("{index}/{processes}"));
    out
}

/// Parses `I/P` of `--child`.
pub fn parse_child(s: &str) -> Result<(usize, usize), LoadError> {
    let bad = || LoadError::Args(format!("--child wants INDEX/PROCESSES, got {s:?}"));
    let (i, p) = s.split_once('/').ok_or_else(bad)?;
    let (i, p): (usize, usize) = (i.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?);
    if p == 0 || i >= p {
        return Err(bad());
    }
    Ok((i, p))
}

/// Merges the children's summaries into one.
pub fn merge(parts: Vec<LoadSummary>) -> Result<LoadSummary, LoadError> {
    let mut hist = new_histogram()?;
    let mut out: Option<LoadSummary> = None;
    let processes = parts.len();
    for p in parts {
        let h = decode_histogram(
            p.histogram_v2.as_deref().ok_or_else(|| LoadError::Histogram("a child sent no histogram".into()))?,
        )?;
        hist.add(&h).map_err(|e| LoadError::Histogram(format!("{e:?}")))?;
        match out.as_mut() {
            None => out = Some(p),
            Some(m) => {
                m.connections += p.connections;
                m.failed += p.failed;
                m.seconds = m.seconds.max(p.seconds);
                m.records += p.records;
                m.records_per_s += p.records_per_s;
                m.gap_messages += p.gap_messages;
                m.anomalies += p.anomalies;
                m.missing_records += p.missing_records;
                m.client_drops += p.client_drops;
                m.early_closes.extend(p.early_closes);
                m.client_cpu_s = match (m.client_cpu_s, p.client_cpu_s) {
                    (Some(a), Some(b)) => Some(a + b),
                    _ => None,
                };
                m.connect_s = m.connect_s.max(p.connect_s);
                m.refreshes_ok += p.refreshes_ok;
                m.refreshes_refused += p.refreshes_refused;
            }
        }
    }
    let mut m = out.ok_or_else(|| LoadError::Args("no child summaries to merge".into()))?;
    m.processes = processes;
    m.p50_us = hist.value_at_quantile(0.5) as f64;
    m.p99_us = hist.value_at_quantile(0.99) as f64;
    m.p999_us = hist.value_at_quantile(0.999) as f64;
    m.max_us = hist.max() as f64;
    m.samples = hist.len();
    m.histogram_v2 = None;
    Ok(m)
}

/// What a child said.
#[derive(Debug)]
enum ChildEvent {
    Ready { ok: usize },
    Measuring,
    Progress { records: u64, gaps: u64, anomalies: u64 },
    Done,
    Gone,
}

fn parse_line(line: &str) -> Option<ChildEvent> {
    let rest = line.strip_prefix(TAG)?.trim();
    let mut words = rest.split_whitespace();
    let kind = words.next()?;
    let kv: HashMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(match kind {
        "ready" => ChildEvent::Ready { ok: num("ok") as usize },
        "measuring" => ChildEvent::Measuring,
        "progress" => ChildEvent::Progress { records: num("records"), gaps: num("gaps"), anomalies: num("anomalies") },
        "done" => ChildEvent::Done,
        _ => return None,
    })
}

/// Parent-side settings.
#[derive(Debug, Clone)]
pub struct MultiOptions {
    /// Child processes.
    pub processes: usize,
    /// The parent's own arguments (without the program name).
    pub argv: Vec<String>,
    /// Server admin URL (tickgate counters).
    pub admin: Option<String>,
    /// Server process id.
    pub server_pid: Option<u32>,
    /// Print progress lines.
    pub progress: bool,
}

/// Runs the children and merges what they measured.
pub async fn run(m: MultiOptions) -> Result<LoadSummary, LoadError> {
    let exe = std::env::current_exe()?;
    let probe = ServerProbe::new(m.admin.clone(), m.server_pid);
    let rss_before = probe.rss();
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, ChildEvent)>();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    let mut stdouts = Vec::new();
    for i in 0..m.processes {
        let mut child = tokio::process::Command::new(&exe)
            .args(child_args(&m.argv, i, m.processes))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let err = child.stderr.take().ok_or_else(|| LoadError::Child { index: i, message: "no stderr".into() })?;
        let mut out = child.stdout.take().ok_or_else(|| LoadError::Child { index: i, message: "no stdout".into() })?;
        stdins.push(child.stdin.take());
        let tx = ev_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match parse_line(&line) {
                    Some(ev) => {
                        let _ = tx.send((i, ev));
                    }
                    None => eprintln!("[p{i}] {line}"),
                }
            }
            let _ = tx.send((i, ChildEvent::Gone));
        });
        stdouts.push(tokio::spawn(async move {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s).await;
            s
        }));
        children.push(child);
    }
    drop(ev_tx);

    let started = Instant::now();
    let mut gone = vec![false; m.processes];
    let mut ready = vec![false; m.processes];
    let mut live = 0usize;
    // Phase 1: every child connected (or gone).
    while ready.iter().zip(&gone).any(|(r, g)| !r && !g) {
        match ev_rx.recv().await {
            Some((i, ChildEvent::Ready { ok })) => {
                ready[i] = true;
                live += ok;
            }
            Some((i, ChildEvent::Gone)) => gone[i] = true,
            Some(_) => {}
            None => break,
        }
    }
    let rss_after = probe.rss();
    if m.progress {
        eprintln!(
            "{live} subscribers live in {} processes after {:.2} s",
            m.processes,
            started.elapsed().as_secs_f64()
        );
    }
    for s in stdins.iter_mut() {
        if let Some(s) = s.as_mut() {
            let _ = s.write_all(b"go\n").await;
            let _ = s.flush().await;
        }
    }
    // Phase 2: every child measuring.
    let mut measuring = vec![false; m.processes];
    while measuring.iter().zip(&gone).any(|(r, g)| !r && !g) {
        match ev_rx.recv().await {
            Some((i, ChildEvent::Measuring)) => measuring[i] = true,
            Some((i, ChildEvent::Gone)) => gone[i] = true,
            Some(_) => {}
            None => break,
        }
    }
    let before = probe.read().await;
    if m.progress {
        eprintln!("measuring");
    }
    // Phase 3: progress until every child is done.
    let window = Instant::now();
    let mut done = vec![false; m.processes];
    let mut latest = vec![(0u64, 0u64, 0u64); m.processes];
    let mut printed = 0u64;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    while done.iter().zip(&gone).any(|(d, g)| !d && !g) {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some((i, ChildEvent::Progress { records, gaps, anomalies })) => latest[i] = (records, gaps, anomalies),
                Some((i, ChildEvent::Done)) => done[i] = true,
                Some((i, ChildEvent::Gone)) => gone[i] = true,
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => if m.progress {
                let total: u64 = latest.iter().map(|l| l.0).sum();
                let gaps: u64 = latest.iter().map(|l| l.1).sum();
                let anomalies: u64 = latest.iter().map(|l| l.2).sum();
                eprintln!(
                    "t={:>4.0}s  records/s={:>10}  gaps={gaps} anomalies={anomalies}",
                    window.elapsed().as_secs_f64(),
                    total.saturating_sub(printed)
                );
                printed = total;
            },
        }
    }
    let after = probe.read().await;
    let mut parts = Vec::new();
    for (i, (mut child, out)) in children.into_iter().zip(stdouts).enumerate() {
        let status = child.wait().await?;
        let text = out.await.map_err(|e| LoadError::Child { index: i, message: e.to_string() })?;
        let summary: LoadSummary = serde_json::from_str(text.trim()).map_err(|e| LoadError::Child {
            index: i,
            message: format!("exit {status}, no summary ({e}): {}", text.chars().take(200).collect::<String>()),
        })?;
        parts.push(summary);
    }
    let mut merged = merge(parts)?;
    let server = probe.numbers(&before, &after, merged.records);
    merged.server_cpu_s_per_million = server.cpu_s_per_million;
    merged.server_cpu_s = server.cpu_s;
    merged.records_per_frame = server.records_per_frame;
    merged.frames_per_write = server.frames_per_write;
    merged.server_rss_bytes = server.rss;
    merged.server_rss_per_conn_bytes = match (rss_before, rss_after) {
        (Some(b), Some(a)) if live > 0 => Some((a - b) / live as f64),
        _ => None,
    };
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_subscriber_once() {
        let parts: Vec<(usize, usize)> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(parts, vec![(4, 0), (3, 4), (3, 7)]);
        assert_eq!(share(10_000, 4, 3), (2500, 7500));
    }

    #[test]
    fn child_arguments_drop_parent_only_flags() {
        let argv: Vec<String> = [
            "load",
            "--processes",
            "4",
            "--admin=http://x",
            "--connections",
            "8",
            "--server-pid",
            "9",
            "--seconds",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(child_args(&argv, 2, 4), vec!["load", "--connections", "8", "--seconds", "3", "--child", "2/4"]);
        assert_eq!(parse_child("2/4").expect("valid"), (2, 4));
        assert!(parse_child("4/4").is_err());
        assert!(parse_child("x").is_err());
    }

    #[test]
    fn ip_slices_do_not_overlap() {
        assert_eq!(ip_slice(8, 4, 0), (1, 2));
        assert_eq!(ip_slice(8, 4, 3), (7, 2));
        assert_eq!(ip_slice(2, 4, 3), (4, 1));
    }

    #[test]
    fn child_lines_parse() {
        assert!(matches!(
            parse_line("@tickgate-load ready ok=5 failed=0 connect_s=0.1"),
            Some(ChildEvent::Ready { ok: 5 })
        ));
        assert!(matches!(
            parse_line("@tickgate-load progress records=7 gaps=1 anomalies=2"),
            Some(ChildEvent::Progress { records: 7, gaps: 1, anomalies: 2 })
        ));
        assert!(parse_line("something else").is_none());
    }
}

//! Tests of the log as a whole: writing, chaining, rotation, resume, failures, verification.

use super::writer::Fault;
use super::*;
use serde_json::json;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        path: dir.join("log").join("audit.log"),
        ..AuditConfig::default()
    }
}

fn rec(i: u64) -> AuditRecord {
    AuditRecord {
        request_id: format!("r{i}"),
        principal: json!({"uid": 1000, "pid": 4242, "exe": "/usr/bin/app"}).into(),
        method: "secrets.get".into(),
        resource: Some(format!("db_{i}")),
        result: AuditResult::Ok,
        code: None,
        latency_us: 100 + i,
        transport: "unix",
        params: json!({"key": format!("db_{i}"), "password": "hunter2"}),
    }
}

async fn write_n(log: &AuditLog, from: u64, n: u64) {
    for i in from..from + n {
        log.record(rec(i)).await.unwrap();
    }
}

fn read_lines(path: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(path).unwrap();
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(|l| l.to_vec())
        .collect()
}

fn write_lines(path: &Path, lines: &[Vec<u8>]) {
    fs::write(path, lines.concat()).unwrap();
}

fn broken_at(err: &VerifyError) -> (PathBuf, u64, Problem) {
    let (f, l, p) = err
        .location()
        .unwrap_or_else(|| panic!("not a chain error: {err}"));
    (f.to_owned(), l, p.clone())
}

/// The rotated files, oldest first, then the live file.
fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<PathBuf> = (1..1000)
        .map(|n| format::rotated_path(path, n))
        .take_while(|p| p.exists())
        .collect();
    rotated.reverse();
    rotated.push(path.to_owned());
    rotated
}

#[tokio::test]
async fn lines_have_the_chain_fields_first_then_the_sanitized_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    let mut r = rec(1);
    r.result = AuditResult::Denied;
    r.code = Some("E_POLICY".into());
    log.record(r).await.unwrap();
    log.close().await;

    let lines = read_lines(&cfg.path);
    assert_eq!(lines.len(), 1);
    let line = std::str::from_utf8(&lines[0]).unwrap();
    assert!(line.starts_with("{\"seq\":1,\"time\":\""), "{line}");
    assert!(line.ends_with("}\n"));
    let zeros = "0".repeat(64);
    let order = [
        "\"seq\":1,".to_string(),
        "\"time\":\"".into(),
        format!("\"prev\":\"{zeros}\",\"request_id\":\"r1\","),
        "\"principal\":{".into(),
        "\"method\":\"secrets.get\",\"resource\":\"db_1\",\"result\":\"denied\",\"code\":\"E_POLICY\",\"latency_us\":101,\"transport\":\"unix\",\"params\":{".into(),
    ];
    let mut at = 0;
    for part in &order {
        let i = line[at..]
            .find(part.as_str())
            .unwrap_or_else(|| panic!("{part} not after {at} in {line}"));
        at += i + part.len();
    }
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v["params"],
        json!({"key": "db_1", "password": "<redacted 9 bytes>"})
    );
    let time = v["time"].as_str().unwrap();
    assert_eq!(time.len(), "2024-05-01T12:34:56.123456Z".len());
    assert!(time.ends_with('Z'));

    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.path), 0o600);
    assert_eq!(mode(cfg.path.parent().unwrap()), 0o700);
    assert_eq!(mode(&format::head_path(&cfg.path)), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_form_one_chain_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move { write_n(&log, t * 1000, 50).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(log.stats().records, 1600);
    assert_eq!(log.stats().last_seq, 1600);
    log.close().await;
    let report = verify(&cfg.path).unwrap();
    assert_eq!(report.records, 1600);
    assert_eq!((report.first_seq, report.last_seq), (1, 1600));
    assert_eq!(report.continues_from_seq, None);
    assert_eq!(report.head_seq, Some(1600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_simultaneous_records_are_all_acknowledged_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    // Hold the writer so that all 1000 are queued when it looks: one write, one sync.
    log.inject(Fault::Stall(Duration::from_millis(500))).await;
    let tasks: Vec<_> = (0..1000u64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(rec(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = log.stats();
    assert_eq!((stats.records, stats.batches), (1000, 1));
    log.close().await;
    assert_eq!(verify(&cfg.path).unwrap().records, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_records_are_written_at_once_and_synced_shortly_after_or_with_a_waiting_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    // Ten probes queued behind a stalled writer form one batch; the second stall is processed
    // right after that batch is committed, so the deferred sync cannot have happened yet.
    log.inject(Fault::Stall(Duration::from_millis(200))).await;
    for i in 0..10 {
        log.record_queued(rec(i)).await.unwrap();
    }
    log.inject(Fault::Stall(Duration::from_millis(100))).await;
    let s = log.stats();
    assert_eq!((s.records, s.batches, s.syncs), (10, 1, 0), "{s:?}");
    assert_eq!(
        read_lines(&cfg.path).len(),
        10,
        "probes are written before any sync"
    );

    // With nothing else arriving, the writer syncs them on its own, once.
    let t0 = Instant::now();
    while log.stats().syncs == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the probe batch was never synced"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(writer::PROBE_SYNC_DELAY * 3).await;
    assert_eq!(log.stats().syncs, 1);

    // Probes, then a record whose caller waits: one sync covers them all before its reply.
    log.inject(Fault::Stall(Duration::from_millis(100))).await;
    for i in 10..20 {
        log.record_queued(rec(i)).await.unwrap();
    }
    log.record(rec(20)).await.unwrap();
    // (Counted before the acknowledgement, unlike `records`.)
    assert_eq!(log.stats().syncs, 2);
    log.close().await;
    assert_eq!(verify(&cfg.path).unwrap().records, 21);
}

/// Writes `n` records, closes, returns the config and the lines.
async fn closed_log(dir: &Path, n: u64) -> (AuditConfig, Vec<Vec<u8>>) {
    let cfg = config(dir);
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 1, n).await;
    log.close().await;
    let lines = read_lines(&cfg.path);
    assert_eq!(lines.len() as u64, n);
    (cfg, lines)
}

#[tokio::test]
async fn editing_any_byte_of_any_line_is_reported_at_that_line() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, lines) = closed_log(dir.path(), 5).await;
    verify(&cfg.path).unwrap();
    for (li, line) in lines.iter().enumerate() {
        for bi in 0..line.len() - 1 {
            let mut edited = lines.clone();
            edited[li][bi] = if line[bi] == b'x' { b'y' } else { b'x' };
            write_lines(&cfg.path, &edited);
            let err = verify(&cfg.path).expect_err("edit not detected");
            let (file, at, problem) = broken_at(&err);
            assert_eq!(file, cfg.path);
            assert_eq!(at, li as u64 + 1, "byte {bi} of line {}: {problem}", li + 1);
        }
    }
}

/// Changes one hex digit of a line's `prev` to another hex digit (still valid JSON).
fn edit_prev(line: &mut [u8]) {
    let at = line.windows(8).position(|w| w == b"\"prev\":\"").unwrap() + 8;
    line[at] = if line[at] == b'a' { b'b' } else { b'a' };
}

#[tokio::test]
async fn an_edited_prev_names_its_own_line_not_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, lines) = closed_log(dir.path(), 5).await;
    for target in [1usize, 2, 4] {
        let mut edited = lines.clone();
        edit_prev(&mut edited[target]);
        write_lines(&cfg.path, &edited);
        let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
        assert_eq!((at, problem), (target as u64 + 1, Problem::Edited));
    }
    // The last line's prev: only the head can tell it from an edit of the line before.
    fs::remove_file(format::head_path(&cfg.path)).unwrap();
    let (_, at, _) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(at, 4, "without a head the earlier line is named");
}

#[tokio::test]
async fn removing_a_middle_line_is_a_seq_gap_at_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, mut lines) = closed_log(dir.path(), 10).await;
    lines.remove(3);
    write_lines(&cfg.path, &lines);
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(at, 4);
    assert_eq!(
        problem,
        Problem::SeqGap {
            expected: 4,
            found: 5
        }
    );
}

#[tokio::test]
async fn swapping_two_lines_is_detected_at_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, mut lines) = closed_log(dir.path(), 10).await;
    lines.swap(5, 6);
    write_lines(&cfg.path, &lines);
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(at, 6);
    assert_eq!(
        problem,
        Problem::SeqGap {
            expected: 6,
            found: 7
        }
    );
}

#[tokio::test]
async fn removing_the_last_line_is_caught_by_the_head_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, mut lines) = closed_log(dir.path(), 10).await;
    lines.pop();
    write_lines(&cfg.path, &lines);
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(at, 10);
    assert_eq!(
        problem,
        Problem::TailTruncated {
            head_seq: 10,
            last_seq: 9
        }
    );

    // The documented limit: without the head, a shorter chain is still a valid chain.
    fs::remove_file(format::head_path(&cfg.path)).unwrap();
    assert_eq!(verify(&cfg.path).unwrap().records, 9);
}

#[tokio::test]
async fn bad_json_and_torn_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, lines) = closed_log(dir.path(), 3).await;
    let mut bad = lines.clone();
    bad[1] = b"not json\n".to_vec();
    write_lines(&cfg.path, &bad);
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(at, 2);
    assert!(matches!(problem, Problem::BadJson(_)), "{problem:?}");

    let mut torn = lines.clone();
    torn[2].truncate(20);
    write_lines(&cfg.path, &torn);
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!((at, problem), (3, Problem::TornLine));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        max_file_size: 2048,
        keep_files: 100,
        ..config(dir.path())
    };
    let log = AuditLog::open(cfg.clone()).unwrap();
    // Concurrent writers make batches that straddle rotations.
    let tasks: Vec<_> = (0..20u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move { write_n(&log, t * 100, 10).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    log.close().await;
    assert!(log.stats().rotations >= 10, "{:?}", log.stats());

    let files = chain_files(&cfg.path);
    assert_eq!(files.len() as u64, log.stats().rotations + 1);
    for f in &files {
        assert!(
            fs::metadata(f).unwrap().len() <= 2048,
            "{} too large",
            f.display()
        );
    }
    let report = verify_files(&files).unwrap();
    assert_eq!(
        (report.records, report.first_seq, report.last_seq),
        (200, 1, 200)
    );

    // The live file alone verifies as a continuation.
    let live = verify(&cfg.path).unwrap();
    assert_eq!(live.last_seq, 200);
    assert!(live.continues_from_seq.is_some());

    // A missing middle file is a gap at the first line of the file after it.
    let mut holed = files.clone();
    let gone = holed.remove(3);
    let (file, at, problem) = broken_at(&verify_files(&holed).unwrap_err());
    assert_eq!(
        (file.as_path(), at),
        (files[4].as_path(), 1),
        "{gone:?}: {problem}"
    );
    assert!(matches!(problem, Problem::SeqGap { .. }));
}

#[tokio::test]
async fn rotation_keeps_only_keep_files_and_a_reload_can_lower_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        max_file_size: 1024,
        keep_files: 3,
        ..config(dir.path())
    };
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 60).await;
    assert!(format::rotated_path(&cfg.path, 3).exists());
    assert!(!format::rotated_path(&cfg.path, 4).exists());
    let report = verify_files(&chain_files(&cfg.path)).unwrap();
    assert_eq!(report.last_seq, 60);
    assert!(report.continues_from_seq.is_some());

    log.reopen(AuditConfig {
        keep_files: 1,
        ..cfg.clone()
    })
    .unwrap();
    write_n(&log, 60, 20).await;
    assert!(format::rotated_path(&cfg.path, 1).exists());
    assert!(!format::rotated_path(&cfg.path, 2).exists());
    assert!(!format::rotated_path(&cfg.path, 3).exists());
    log.close().await;
    assert_eq!(verify_files(&chain_files(&cfg.path)).unwrap().last_seq, 80);
}

#[tokio::test]
async fn a_reload_changes_the_size_limit_but_refuses_a_new_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 5).await;
    assert_eq!(log.stats().rotations, 0);
    log.reopen(AuditConfig {
        max_file_size: 512,
        ..cfg.clone()
    })
    .unwrap();
    write_n(&log, 5, 5).await;
    assert!(log.stats().rotations > 0);

    let moved = AuditConfig {
        path: dir.path().join("other.log"),
        ..cfg.clone()
    };
    assert!(matches!(log.reopen(moved), Err(AuditError::Config(_))));
    assert!(matches!(
        log.reopen(AuditConfig {
            keep_files: 0,
            ..cfg.clone()
        }),
        Err(AuditError::Config(_))
    ));
    assert_eq!(log.path(), cfg.path);
    log.close().await;
}

#[tokio::test]
async fn a_reload_with_a_new_path_still_applies_the_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    log.reconfigure(AuditConfig {
        path: dir.path().join("elsewhere.log"),
        max_file_size: 512,
        ..cfg.clone()
    });
    write_n(&log, 0, 5).await;
    assert!(log.stats().rotations > 0);
    assert_eq!(log.path(), cfg.path);
    // Invalid settings change nothing.
    log.reconfigure(AuditConfig {
        keep_files: 0,
        max_file_size: 1 << 30,
        ..cfg.clone()
    });
    let before = log.stats().rotations;
    write_n(&log, 5, 5).await;
    assert!(log.stats().rotations > before);
    log.close().await;
}

#[tokio::test]
async fn reopening_continues_seq_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 10).await;
    log.close().await;

    // Without the head too, as after a crash that lost it.
    fs::remove_file(format::head_path(&cfg.path)).unwrap();
    let log = AuditLog::open(cfg.clone()).unwrap();
    assert_eq!(log.stats().last_seq, 10);
    write_n(&log, 10, 10).await;
    log.close().await;
    let report = verify(&cfg.path).unwrap();
    assert_eq!((report.records, report.last_seq), (20, 20));
}

#[tokio::test]
async fn an_empty_live_file_after_a_rotation_resumes_from_the_rotated_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = closed_log(dir.path(), 4).await;
    // A crash just after the rename and the creation of the new file.
    fs::rename(&cfg.path, format::rotated_path(&cfg.path, 1)).unwrap();
    fs::write(&cfg.path, "").unwrap();
    fs::remove_file(format::head_path(&cfg.path)).unwrap();
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 4, 2).await;
    log.close().await;
    let report = verify_files(&chain_files(&cfg.path)).unwrap();
    assert_eq!((report.records, report.last_seq), (6, 6));
}

#[tokio::test]
async fn a_torn_last_line_is_moved_aside_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, lines) = closed_log(dir.path(), 3).await;
    let fragment = b"{\"seq\":4,\"time\":\"2024-";
    let mut torn = lines.clone();
    torn.push(fragment.to_vec());
    write_lines(&cfg.path, &torn);

    let log = AuditLog::open(cfg.clone()).unwrap();
    let aside: Vec<PathBuf> = fs::read_dir(cfg.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(fs::read(&aside[0]).unwrap(), fragment);
    assert_eq!(read_lines(&cfg.path), lines);

    write_n(&log, 3, 2).await;
    log.close().await;
    let report = verify(&cfg.path).unwrap();
    assert_eq!((report.records, report.last_seq), (5, 5));
}

#[tokio::test]
async fn records_removed_while_stopped_stay_visible_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, mut lines) = closed_log(dir.path(), 5).await;
    lines.truncate(3);
    write_lines(&cfg.path, &lines);
    // The daemon continues from the head (seq 5), not from what is left.
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 5, 1).await;
    log.close().await;
    let (_, at, problem) = broken_at(&verify(&cfg.path).unwrap_err());
    assert_eq!(
        (at, problem),
        (
            4,
            Problem::SeqGap {
                expected: 4,
                found: 6
            }
        )
    );
}

#[tokio::test]
async fn a_failing_disk_fails_records_every_time_and_the_log_recovers_intact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 2).await;

    let full = fs::OpenOptions::new()
        .append(true)
        .open("/dev/full")
        .unwrap();
    log.inject(Fault::UseFile(full)).await;
    for i in 0..3 {
        let err = log.record(rec(100 + i)).await.unwrap_err();
        assert!(matches!(err, AuditError::Write(_)), "{err}");
    }
    let stats = log.stats();
    assert!(stats.write_errors >= 3);
    assert!(stats.last_error.is_some());
    assert_eq!(stats.records, 2);

    // The disk comes back: the writer picks up where the last acknowledged record was.
    let again = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(&cfg.path)
        .unwrap();
    log.inject(Fault::UseFile(again)).await;
    write_n(&log, 2, 2).await;
    log.close().await;
    let report = verify(&cfg.path).unwrap();
    assert_eq!((report.records, report.last_seq), (4, 4));
}

#[tokio::test]
async fn a_stuck_disk_times_out_and_the_abandoned_record_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = AuditConfig {
        write_timeout: Duration::from_millis(200),
        ..config(dir.path())
    };
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 1).await;
    log.inject(Fault::Stall(Duration::from_secs(2))).await;
    let started = Instant::now();
    let err = log.record(rec(99)).await.unwrap_err();
    assert!(matches!(err, AuditError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "record() waited for the disk"
    );

    log.reopen(AuditConfig {
        write_timeout: Duration::from_secs(10),
        ..cfg.clone()
    })
    .unwrap();
    write_n(&log, 1, 1).await;
    assert_eq!(log.stats().abandoned, 1);
    log.close().await;
    let text = fs::read_to_string(&cfg.path).unwrap();
    assert!(!text.contains("\"r99\""));
    assert_eq!(verify(&cfg.path).unwrap().records, 2);
}

#[tokio::test]
async fn the_head_file_catches_up_when_the_log_goes_idle() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 3).await;
    let head = format::head_path(&cfg.path);
    let mut seen = String::new();
    for _ in 0..100 {
        seen = fs::read_to_string(&head).unwrap_or_default();
        if seen.starts_with("{\"seq\":3,") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.starts_with("{\"seq\":3,"), "head is {seen:?}");
    assert_eq!(verify(&cfg.path).unwrap().head_seq, Some(3));
    log.close().await;
}

#[tokio::test]
async fn records_after_close_fail() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg).unwrap();
    let other = log.clone();
    log.close().await;
    assert!(matches!(
        other.record(rec(1)).await,
        Err(AuditError::Closed)
    ));
    log.close().await; // a second close is harmless
}

#[tokio::test]
async fn dropping_every_handle_closes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let log = AuditLog::open(cfg.clone()).unwrap();
    write_n(&log, 0, 3).await;
    drop(log);
    let head = format::head_path(&cfg.path);
    for _ in 0..100 {
        if fs::read_to_string(&head).is_ok_and(|h| h.starts_with("{\"seq\":3,")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(verify(&cfg.path).unwrap().head_seq, Some(3));
}

#[test]
fn unsafe_paths_and_bad_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    fs::write(&file, "").unwrap();
    let under_file = AuditConfig {
        path: file.join("audit.log"),
        ..AuditConfig::default()
    };
    assert!(matches!(
        AuditLog::open(under_file),
        Err(AuditError::Open { .. })
    ));

    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let symlink = AuditConfig {
        path: link,
        ..AuditConfig::default()
    };
    assert!(matches!(
        AuditLog::open(symlink),
        Err(AuditError::Open { .. })
    ));

    let device = AuditConfig {
        path: "/dev/null".into(),
        ..AuditConfig::default()
    };
    assert!(matches!(
        AuditLog::open(device),
        Err(AuditError::Open { .. })
    ));

    let keep0 = AuditConfig {
        keep_files: 0,
        ..config(dir.path())
    };
    assert!(matches!(AuditLog::open(keep0), Err(AuditError::Config(_))));
}

#[test]
fn a_log_whose_last_line_is_not_a_record_is_not_continued() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
    fs::write(&cfg.path, "garbage\n").unwrap();
    assert!(matches!(
        AuditLog::open(cfg),
        Err(AuditError::Corrupt { .. })
    ));
}

/// Throughput with N concurrent writers, each awaiting its record before the next (a request
/// pipeline that answers only after the audit record is durable). Run with
/// `cargo test --release -p wardend audit::tests::throughput -- --ignored --nocapture`;
/// `AUDIT_BENCH_DIR` picks the filesystem, `AUDIT_BENCH_SYNC_US` adds that much to each sync
/// (on tmpfs, to measure against a given disk latency).
#[test]
#[ignore = "measurement, not a test"]
fn throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for writers in [1u64, 16, 64, 256] {
        let dir = tempfile::tempdir_in(env_dir()).unwrap();
        let cfg = config(dir.path());
        let log = AuditLog::open(cfg.clone()).unwrap();
        let slow_sync = std::env::var("AUDIT_BENCH_SYNC_US")
            .ok()
            .and_then(|s| s.parse().ok());
        if let Some(us) = slow_sync {
            rt.block_on(log.inject(Fault::SlowSync(Duration::from_micros(us))));
        }
        let secs = 3.0;
        let started = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..writers)
                .map(|t| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let mut i = t << 32;
                        while started.elapsed().as_secs_f64() < secs {
                            log.record(rec(i)).await.unwrap();
                            i += 1;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            log.close().await;
        });
        let elapsed = started.elapsed().as_secs_f64();
        let s = log.stats();
        println!(
            "{writers:>4} writers: {:>8.0} records/s, {:>6.1} records/batch, {:>5.0} batches/s, {} bytes/record",
            s.records as f64 / elapsed,
            s.records as f64 / s.batches as f64,
            s.batches as f64 / elapsed,
            s.bytes / s.records.max(1),
        );
        verify(&cfg.path).unwrap();
    }
}

fn env_dir() -> PathBuf {
    std::env::var_os("AUDIT_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

//! How jobs and their output look on the wire.
//!
//! A job (`jobs.start`, `jobs.status`, `jobs.stop`, each entry of `jobs.list`):
//! `id`, `owner`, `command`, `state` (`running` or `ended`), `started_at`, `ended_at`, `pid`,
//! and once ended `end`, the reason spelled out: `{"reason": "exited", "exit_code": N}`,
//! `{"reason": "signaled", "signal": N, "signal_name": "SIGTERM"}`, `{"reason": "oom_killed"}`
//! or `{"reason": "unknown"}`, with `stop_requested`, `killed_after_grace` and
//! `pids_limit_hit`. In detail (not in lists): `limits`, `network`, `output_bytes`, `usage`.
//!
//! Output frames of `jobs.attach` carry bytes as standard base64 (RFC 4648, padded), so every
//! byte value survives JSON: `{"offset": N, "stream": "stdout"|"stderr", "data": "…"}`, where
//! `offset` is the log offset of the first byte; a range lost beyond the log's bounds is
//! `{"dropped": {"from": A, "to": B}}`. Frames are written here directly rather than through a
//! JSON value: the base64 text needs no escaping, and output is the one large thing warden
//! sends.
//!
//! On length-prefixed connections a client may ask for **binary output frames** instead
//! (`"binary": true`): no base64 and no JSON around the bytes, a third fewer bytes, and no
//! copy in the daemon (the frame holds slices of the job's log; see [`Frame`]). A binary frame is told from a JSON frame by its first byte, which JSON
//! never has:
//!
//! ```text
//! 0x00 | stream: 1 stdout, 2 stderr | offset: u64 big-endian | id length: u16 big-endian
//!      | id: the request's `id` as JSON text | the output bytes
//! ```
//!
//! Dropped ranges and the final reply stay JSON frames.

use super::Entry;
use crate::server::frame::{Frame, Part};
use serde_json::{json, Value};
use std::time::SystemTime;
use warden_exec::{JobReport, JobStatus, Stream};

fn time(t: SystemTime) -> String {
    crate::server::pipeline::rfc3339(t)
}

/// `SIGTERM` for 15, …; `None` for a number without a name here.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}

/// The end reason of a report.
pub fn end_json(r: &JobReport) -> Value {
    let mut v = match r.status {
        JobStatus::Exited(code) => json!({ "reason": "exited", "exit_code": code }),
        JobStatus::Signaled(sig) => {
            json!({ "reason": "signaled", "signal": sig, "signal_name": signal_name(sig) })
        }
        JobStatus::OomKilled => json!({ "reason": "oom_killed" }),
        JobStatus::Unknown => json!({ "reason": "unknown" }),
    };
    v["stop_requested"] = json!(r.stop_requested);
    v["killed_after_grace"] = json!(r.killed_after_grace);
    v["pids_limit_hit"] = json!(r.usage.pids_limit_hits.unwrap_or(0) > 0);
    if let Some(e) = &r.cleanup_error {
        v["cleanup_error"] = json!(e);
    }
    v
}

fn usage_json(r: &JobReport) -> Value {
    let u = &r.usage;
    json!({
        "runtime_ms": r.runtime.as_millis() as u64,
        "cpu_time_ms": u.cpu_time.map(|d| d.as_millis() as u64),
        "cpu_throttled_periods": u.cpu_throttled_periods,
        "memory_peak": u.memory_peak,
        "oom_kills": u.oom_kills,
        "pids_limit_hits": u.pids_limit_hits,
        "io_read_bytes": u.io_read_bytes,
        "io_write_bytes": u.io_write_bytes,
    })
}

/// A job as the API shows it; `detail` adds limits, output size and usage.
pub fn job_json(e: &Entry, detail: bool) -> Value {
    let report = e.job.report();
    let mut v = json!({
        "id": e.id,
        "owner": e.owner,
        "command": e.command,
        "state": if report.is_some() { "ended" } else { "running" },
        "started_at": time(e.started_at),
        "ended_at": e.ended_at().map(time),
        "pid": e.job.pid(),
        "end": report.as_deref().map(end_json),
    });
    if detail {
        let l = &e.request.limits;
        v["limits"] = json!({
            "cpu": l.cpu.map(|c| c.quota.as_secs_f64() / c.period.as_secs_f64()),
            "memory": l.memory_max,
            "pids": l.pids_max,
            "io": l.io.iter().map(|d| json!({
                "device": d.device.to_string(),
                "read_bps": d.read_bps, "write_bps": d.write_bps,
                "read_iops": d.read_iops, "write_iops": d.write_iops,
            })).collect::<Vec<_>>(),
        });
        v["network"] = json!(e.request.network);
        v["output_bytes"] = json!(e.job.log().map(|l| l.end()).unwrap_or(0));
        v["usage"] = report.as_deref().map(usage_json).unwrap_or(Value::Null);
    }
    v
}

/// Appends the frame of one stream-reply item to `out`: `{"status":"ok","data":DATA,"id":ID,
/// "stream":true,"final":false}`, the shape `encode_securityd` gives a streamed frame.
fn frame(out: &mut Vec<u8>, id: &Value, data: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(br#"{"status":"ok","data":"#);
    data(out);
    out.extend_from_slice(br#","id":"#);
    // A JSON value always serializes (finite numbers, string keys).
    let _ = serde_json::to_writer(&mut *out, id);
    out.extend_from_slice(br#","stream":true,"final":false}"#);
}

/// An output frame: the concatenation of `parts` (consecutive output of `stream` from
/// `offset`), base64, encoded piece by piece without first joining them.
pub fn data_frame(id: &Value, offset: u64, stream: Stream, parts: &[bytes::Bytes]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len / 3 * 4 + 160);
    frame(&mut out, id, |o| {
        let name = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        o.extend_from_slice(
            format!(r#"{{"offset":{offset},"stream":"{name}","data":""#).as_bytes(),
        );
        encode_parts(parts, o);
        o.extend_from_slice(br#""}"#);
    });
    out
}

/// Base64 of the concatenation of `parts`: whole 3-byte groups of each part are encoded in
/// place, the 1 or 2 bytes left over are carried into the next part's first group; only the
/// very end is padded.
fn encode_parts(parts: &[bytes::Bytes], out: &mut Vec<u8>) {
    let mut carry = [0u8; 3];
    let mut n = 0;
    for p in parts {
        let mut p = &p[..];
        if n > 0 {
            let take = (3 - n).min(p.len());
            carry[n..n + take].copy_from_slice(&p[..take]);
            n += take;
            p = &p[take..];
            if n < 3 {
                continue;
            }
            base64_simd::STANDARD.encode_append(carry, out);
        }
        let whole = p.len() / 3 * 3;
        base64_simd::STANDARD.encode_append(&p[..whole], out);
        let rest = &p[whole..];
        carry[..rest.len()].copy_from_slice(rest);
        n = rest.len();
    }
    if n > 0 {
        base64_simd::STANDARD.encode_append(&carry[..n], out);
    }
}

/// The first byte of a binary output frame.
pub const BINARY_FRAME: u8 = 0;

/// A binary output frame (see the module documentation): consecutive output of `stream` from
/// `offset`, behind a fixed header. The frame holds `parts` themselves (slices of the job's
/// log, or ranges of its spill file), not a copy of them.
pub fn binary_frame(
    id: &Value,
    offset: u64,
    stream: Stream,
    parts: impl IntoIterator<Item = Part>,
) -> Frame {
    // A JSON value always serializes (finite numbers, string keys).
    let id = serde_json::to_vec(id).unwrap_or_default();
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut head = Vec::with_capacity(12 + id.len());
    head.push(BINARY_FRAME);
    head.push(match stream {
        Stream::Stdout => 1,
        Stream::Stderr => 2,
    });
    head.extend_from_slice(&offset.to_be_bytes());
    head.extend_from_slice(&id_len.to_be_bytes());
    head.extend_from_slice(&id[..usize::from(id_len)]);
    let mut all = vec![Part::Mem(bytes::Bytes::from(head))];
    all.extend(parts);
    Frame::from_pieces(all)
}

/// A frame saying `from..to` was dropped before this reader got it.
pub fn dropped_frame(id: &Value, from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    frame(&mut out, id, |o| {
        o.extend_from_slice(format!(r#"{{"dropped":{{"from":{from},"to":{to}}}}}"#).as_bytes())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_frame_carries_header_id_and_raw_bytes() {
        let all: Vec<u8> = (0..=255u8).collect();
        let (a, b) = all.split_at(100);
        let f = binary_frame(
            &json!("req-1"),
            0x0102_0304_0506_0708,
            Stream::Stderr,
            [
                Part::Mem(bytes::Bytes::copy_from_slice(a)),
                Part::Mem(bytes::Bytes::copy_from_slice(b)),
            ],
        );
        // The output is carried as it was given, behind one header part.
        assert_eq!(f.parts().len(), 3);
        let f = f.into_bytes().unwrap();
        assert_eq!(f[0], BINARY_FRAME);
        assert_eq!(f[1], 2);
        assert_eq!(&f[2..10], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&f[10..12], &[0, 7]);
        assert_eq!(&f[12..19], b"\"req-1\"");
        assert_eq!(&f[19..], &all[..]);
    }

    #[test]
    fn a_data_frame_is_the_streamed_reply_shape_with_base64_bytes() {
        let all: Vec<u8> = (0..=255u8).collect();
        let f = data_frame(
            &json!(7),
            42,
            Stream::Stderr,
            &[bytes::Bytes::from(all.clone())],
        );
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(
            (v["id"].clone(), v["stream"].clone(), v["final"].clone()),
            (json!(7), json!(true), json!(false))
        );
        assert_eq!(v["data"]["offset"], 42);
        assert_eq!(v["data"]["stream"], "stderr");
        let back = base64_simd::STANDARD
            .decode_to_vec(v["data"]["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(back, all);
        // The same shape as the generic encoder's frames.
        let mut generic = Vec::new();
        warden_wire::reply::encode_securityd(
            Some(&json!(7)),
            Ok(&v["data"]),
            Some(false),
            &mut generic,
        );
        assert_eq!(serde_json::from_slice::<Value>(&generic).unwrap(), v);
        let d: Value = serde_json::from_slice(&dropped_frame(&json!("x"), 1, 9)).unwrap();
        assert_eq!(d["data"]["dropped"], json!({"from": 1, "to": 9}));
        assert_eq!(d["id"], "x");
    }

    #[test]
    fn output_split_anywhere_encodes_as_the_whole_does() {
        let all: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        let whole = base64_simd::STANDARD.encode_to_string(&all);
        for cuts in [
            vec![],
            vec![1],
            vec![2, 3],
            vec![1, 2, 4, 7, 11],
            vec![500, 501, 999],
        ] {
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts.iter().copied().chain([all.len()]) {
                parts.push(bytes::Bytes::copy_from_slice(&all[at..c]));
                at = c;
            }
            let mut out = Vec::new();
            encode_parts(&parts, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), whole, "{cuts:?}");
        }
    }

    #[test]
    fn signals_have_their_names() {
        assert_eq!(signal_name(libc::SIGKILL), Some("SIGKILL"));
        assert_eq!(signal_name(libc::SIGTERM), Some("SIGTERM"));
        assert_eq!(signal_name(1000), None);
    }
}

//! `fsva status`: one line per mount, from each supervisor's admin socket (or from its
//! runtime record when the supervisor is gone).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use fsva_control::{AdminReply, AdminRequest, Link, MountStatus};
use fsva_supervisor::registry;

pub fn run() -> anyhow::Result<ExitCode> {
    let records = registry::all_records();
    if records.is_empty() {
        println!("no fsva mounts");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  STATE",
        "MOUNTPOINT", "BACKEND", "CHANNEL", "SANDBOX", "APPLIANCE", "UPTIME", "REQUESTS", "ERRORS"
    );
    for record in records {
        let Ok(fields) = registry::read_record(&record) else {
            continue;
        };
        let mountpoint = fields.get("mountpoint").cloned().unwrap_or_default();
        match query(&record.with_extension("sock")) {
            Some(s) => print_status(&s),
            None => println!(
                "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  supervisor gone: run `fsva umount {}`",
                mountpoint,
                fields.get("backend").map(String::as_str).unwrap_or("?"),
                "-", "-", "-", "-", "-", "-", mountpoint
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn query(socket: &std::path::Path) -> Option<MountStatus> {
    let link = Link::connect(socket).ok()?;
    link.send(&AdminRequest::Status, &[]).ok()?;
    match link.recv::<AdminReply>().ok()? {
        (AdminReply::Status(s), _) => Some(s),
        _ => None,
    }
}

fn print_status(s: &MountStatus) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let up = now.saturating_sub(s.started);
    let uptime = if up >= 3600 {
        format!("{}h{:02}m", up / 3600, (up % 3600) / 60)
    } else {
        format!("{}m{:02}s", up / 60, up % 60)
    };
    println!(
        "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  {}",
        s.mountpoint.display(),
        s.backend,
        s.channel,
        s.sandbox,
        s.appliance_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        uptime,
        s.requests,
        s.errors,
        s.state
    );
}

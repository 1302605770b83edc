//! `fsva status`: one line per mount, from each supervisor's admin socket (or from its
//! runtime record when the supervisor is gone).

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use fsva_control::{
    AdminReply, AdminRequest, Link, LinkError, MigrationStatus, MountStatus, RecoveryStatus,
};

/// Prints a line, quietly stopping at a closed pipe (`fsva status | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
use fsva_supervisor::registry;

pub fn run() -> anyhow::Result<ExitCode> {
    let records = registry::all_records();
    if records.is_empty() {
        outln!("no fsva mounts");
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  STATE",
        "MOUNTPOINT",
        "BACKEND",
        "CHANNEL",
        "SANDBOX",
        "APPLIANCE",
        "UPTIME",
        "REQUESTS",
        "ERRORS"
    );
    for record in records {
        let Ok(fields) = registry::read_record(&record) else {
            continue;
        };
        let mountpoint = fields.get("mountpoint").cloned().unwrap_or_default();
        match query(&record.with_extension("sock")) {
            Ok((s, r, m)) => print_status(&s, r.as_ref(), m.as_ref()),
            Err(Query::Incompatible(e)) => outln!(
                "{mountpoint:<28} supervisor answered in a form this fsva does not understand ({e}): it runs another fsva version"
            ),
            Err(Query::Gone) => outln!(
                "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  supervisor gone: run `fsva umount {}`",
                mountpoint,
                fields.get("backend").map(String::as_str).unwrap_or("?"),
                "-", "-", "-", "-", "-", "-", mountpoint
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

enum Query {
    /// Nobody listens: the supervisor was killed.
    Gone,
    /// Somebody answered, but not in this version's format.
    Incompatible(String),
}

/// What a supervisor says about its mount.
type Answer = (MountStatus, Option<RecoveryStatus>, Option<MigrationStatus>);

/// Asks the supervisor at `socket` for its status (with the recovery and migration
/// counters, or without them from an older supervisor that does not know them).
fn query(socket: &std::path::Path) -> Result<Answer, Query> {
    match ask(socket, AdminRequest::StatusMigration) {
        Err(Query::Incompatible(_)) => match ask(socket, AdminRequest::StatusFull) {
            Err(Query::Incompatible(_)) => ask(socket, AdminRequest::Status),
            other => other,
        },
        other => other,
    }
}

fn ask(socket: &std::path::Path, request: AdminRequest) -> Result<Answer, Query> {
    let link = Link::connect(socket).map_err(|_| Query::Gone)?;
    let _ = rustix::net::sockopt::set_socket_timeout(
        &link,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(5)),
    );
    link.send(&request, &[]).map_err(|_| Query::Gone)?;
    match link.recv::<AdminReply>() {
        Ok((AdminReply::Status(s), _)) => Ok((*s, None, None)),
        Ok((AdminReply::StatusFull(s, r), _)) => Ok((*s, Some(r), None)),
        Ok((AdminReply::StatusMigration(s, r, m), _)) => Ok((*s, Some(r), Some(m))),
        Ok((other, _)) => Err(Query::Incompatible(format!("{other:?}"))),
        Err(LinkError::Decode(e)) => Err(Query::Incompatible(e.to_string())),
        // An older supervisor drops a request it cannot read.
        Err(LinkError::Closed) => Err(Query::Incompatible("request not understood".into())),
        Err(_) => Err(Query::Gone),
    }
}

fn print_status(s: &MountStatus, r: Option<&RecoveryStatus>, m: Option<&MigrationStatus>) {
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
    outln!(
        "{:<28} {:<22} {:<8} {:<10} {:>9} {:>8} {:>10} {:>7}  {}",
        s.mountpoint.display(),
        fit(&s.backend, 22),
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
    outln!(
        "{:<28} data: {}; {} backing files open",
        "",
        s.data_path,
        s.backing_files
    );
    if let Some(budget) = s.cache_budget {
        let used = s
            .memory_used
            .map(|u| format!("{} MiB", u >> 20))
            .unwrap_or_else(|| "?".into());
        outln!(
            "{:<28} cache budget: {} MiB; appliance memory in use: {used}",
            "",
            budget >> 20
        );
    }
    if s.restarts > 0 {
        outln!(
            "{:<28} restarted live {} time(s); requests waited {:.1} ms the last time",
            "",
            s.restarts,
            s.last_downtime_us.unwrap_or(0) as f64 / 1000.0
        );
    }
    if let Some(r) = r {
        if r.recoveries > 0 || r.fresh_starts > 0 {
            outln!(
                "{:<28} recovered after {} appliance crash(es){}; requests waited {:.1} ms the last time",
                "",
                r.recoveries,
                if r.fresh_starts > 0 {
                    format!(", {} time(s) with a fresh file system (state lost)", r.fresh_starts)
                } else {
                    String::new()
                },
                r.last_downtime_us.unwrap_or(0) as f64 / 1000.0
            );
        } else if r.journaled && m.is_none_or(|m| m.host.is_none()) {
            outln!(
                "{:<28} crash recovery: on (a successor takes over with the state)",
                ""
            );
        }
    }
    if let Some(m) = m.filter(|m| m.migrations > 0) {
        outln!(
            "{:<28} migrated {} time(s), now served from {}{}; requests waited {:.1} ms the last time",
            "",
            m.migrations,
            m.host.as_deref().unwrap_or("this host"),
            m.remote_pid
                .map(|p| format!(" (appliance pid {p} there)"))
                .unwrap_or_default(),
            m.last_downtime_us.unwrap_or(0) as f64 / 1000.0
        );
    }
}

/// `text` in at most `width` characters, keeping its end (where paths differ).
fn fit(text: &str, width: usize) -> String {
    let n = text.chars().count();
    if n <= width {
        return text.to_string();
    }
    let tail: String = text.chars().skip(n - (width - 1)).collect();
    format!("…{tail}")
}

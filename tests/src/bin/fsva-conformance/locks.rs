//! File locks across processes: POSIX record locks (F_SETLK conflicts, F_GETLK holder
//! pid and range, shared read locks, release on close of any fd), flock(2) conflicts,
//! independence of flock and POSIX locks, and blocked F_SETLKW / LOCK_EX interrupted by a
//! signal (EINTR). Children run under the watchdog, so a hang shows as `HANG`.

use std::os::fd::OwnedFd;
use std::path::Path;

use crate::check::{check, Check, Ctx};
use crate::proc;
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("locks.posix_conflict", posix_conflict),
    check("locks.posix_shared", posix_shared),
    check("locks.posix_unlock", posix_unlock),
    check("locks.posix_close_releases", posix_close_releases),
    check("locks.posix_bad_mode", posix_bad_mode),
    check("locks.flock_conflict", flock_conflict),
    check("locks.flock_shared", flock_shared),
    check("locks.flock_posix_independent", flock_posix_independent),
    check("locks.setlkw_eintr", setlkw_eintr),
    check("locks.flock_eintr", flock_eintr),
];

fn setlk(fd: &OwnedFd, cmd: i32, kind: i32, start: i64, len: i64) -> sys::Res<()> {
    let mut fl = sys::lock_range(kind, start, len);
    sys::fcntl_lock(fd, cmd, &mut fl)
}

/// F_GETLK for a write lock on the range; reports what is in the way.
fn getlk(fd: &OwnedFd, start: i64, len: i64, holder: libc::pid_t) -> String {
    let mut fl = sys::lock_range(libc::F_WRLCK, start, len);
    match sys::fcntl_lock(fd, libc::F_GETLK, &mut fl) {
        Err(e) => format!("err={e}"),
        Ok(_) if fl.l_type == libc::F_UNLCK as i16 => "unlocked".into(),
        Ok(_) => format!(
            "type={} start={} len={} pid_is_holder={}",
            if fl.l_type == libc::F_WRLCK as i16 {
                "W"
            } else {
                "R"
            },
            fl.l_start,
            fl.l_len,
            fl.l_pid == holder
        ),
    }
}

fn flock(fd: &OwnedFd, op: i32) -> sys::Res<()> {
    sys::flock(fd, op)
}

fn file(c: &Ctx) -> std::path::PathBuf {
    let p = c.p("f");
    let _ = sys::write_file(&p, &[0u8; 1000]);
    p
}

fn rw(p: &Path) -> OwnedFd {
    sys::open(p, libc::O_RDWR, 0).expect("open")
}

fn posix_conflict(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let held = setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 0, 100);
    let own_getlk = getlk(&fd, 0, 100, 0);
    let parent = sys::getpid();
    let child = proc::in_child(|| {
        let fd = rw(&p);
        format!(
            "overlap={} disjoint={} getlk=[{}] getlk_free_range=[{}]",
            show(&setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 50, 10)),
            show(&setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 200, 100)),
            getlk(&fd, 10, 20, parent),
            getlk(&fd, 500, 10, parent),
        )
    });
    format!(
        "hold={} own_getlk={} child: {child}",
        show(&held),
        own_getlk
    )
}

fn posix_shared(c: &Ctx) -> String {
    let p = file(c);
    let fd = sys::open(&p, libc::O_RDONLY, 0).expect("open");
    let held = setlk(&fd, libc::F_SETLK, libc::F_RDLCK, 0, 0);
    let child = proc::in_child(|| {
        let fd = rw(&p);
        format!(
            "read_lock={} write_lock={}",
            show(&setlk(&fd, libc::F_SETLK, libc::F_RDLCK, 0, 10)),
            show(&setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 0, 10))
        )
    });
    format!("hold_read={} child: {child}", show(&held))
}

fn posix_unlock(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let _ = setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 0, 0);
    // Unlock the middle: two locked pieces remain.
    let un = setlk(&fd, libc::F_SETLK, libc::F_UNLCK, 100, 100);
    let parent = sys::getpid();
    let child = proc::in_child(|| {
        let fd = rw(&p);
        format!(
            "middle={} before={} after_getlk=[{}]",
            show(&setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 120, 10)),
            show(&setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 50, 10)),
            getlk(&fd, 150, 100, parent)
        )
    });
    format!("unlock_middle={} child: {child}", show(&un))
}

fn posix_close_releases(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let other = sys::open(&p, libc::O_RDONLY, 0).expect("open");
    let _ = setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 0, 0);
    let before = proc::in_child(|| show(&setlk(&rw(&p), libc::F_SETLK, libc::F_WRLCK, 0, 1)));
    drop(other);
    let after = proc::in_child(|| show(&setlk(&rw(&p), libc::F_SETLK, libc::F_WRLCK, 0, 1)));
    format!("child_before_close={before} child_after_closing_other_fd={after}")
}

fn posix_bad_mode(c: &Ctx) -> String {
    let p = file(c);
    let ro = sys::open(&p, libc::O_RDONLY, 0).expect("open");
    let wo = sys::open(&p, libc::O_WRONLY, 0).expect("open");
    format!(
        "write_lock_on_rdonly={} read_lock_on_wronly={} bad_type={}",
        show(&setlk(&ro, libc::F_SETLK, libc::F_WRLCK, 0, 1)),
        show(&setlk(&wo, libc::F_SETLK, libc::F_RDLCK, 0, 1)),
        show(&setlk(&ro, libc::F_SETLK, 99, 0, 1)),
    )
}

fn flock_conflict(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let held = flock(&fd, libc::LOCK_EX);
    let child = proc::in_child(|| {
        let fd = rw(&p);
        format!(
            "ex={} sh={}",
            show(&flock(&fd, libc::LOCK_EX | libc::LOCK_NB)),
            show(&flock(&fd, libc::LOCK_SH | libc::LOCK_NB))
        )
    });
    let _ = flock(&fd, libc::LOCK_UN);
    let after = proc::in_child(|| show(&flock(&rw(&p), libc::LOCK_EX | libc::LOCK_NB)));
    format!("hold={} child: {child} after_unlock={after}", show(&held))
}

fn flock_shared(c: &Ctx) -> String {
    let p = file(c);
    let fd = sys::open(&p, libc::O_RDONLY, 0).expect("open");
    let held = flock(&fd, libc::LOCK_SH);
    let child = proc::in_child(|| {
        let fd = sys::open(&p, libc::O_RDONLY, 0).expect("open");
        format!(
            "sh={} ex={}",
            show(&flock(&fd, libc::LOCK_SH | libc::LOCK_NB)),
            show(&flock(&fd, libc::LOCK_EX | libc::LOCK_NB))
        )
    });
    let upgrade = flock(&fd, libc::LOCK_EX | libc::LOCK_NB);
    format!(
        "hold_shared={} child: {child} upgrade={}",
        show(&held),
        show(&upgrade)
    )
}

fn flock_posix_independent(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let held = flock(&fd, libc::LOCK_EX);
    let child = proc::in_child(|| show(&setlk(&rw(&p), libc::F_SETLK, libc::F_WRLCK, 0, 0)));
    format!("flock_held={} child_posix_lock={child}", show(&held))
}

/// In the child: SIGALRM handler without SA_RESTART and a 200 ms timer.
fn arm_interrupt() {
    let _ = sys::interrupt_on(libc::SIGALRM);
    let _ = sys::alarm_after_usec(200_000);
}

fn setlkw_eintr(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let held = setlk(&fd, libc::F_SETLK, libc::F_WRLCK, 0, 0);
    let child = proc::in_child(|| {
        let fd = rw(&p);
        arm_interrupt();
        format!(
            "setlkw={}",
            show(&setlk(&fd, libc::F_SETLKW, libc::F_WRLCK, 0, 0))
        )
    });
    let still_held = proc::in_child(|| show(&setlk(&rw(&p), libc::F_SETLK, libc::F_WRLCK, 0, 0)));
    format!(
        "hold={} child: {child} child_after={still_held}",
        show(&held)
    )
}

fn flock_eintr(c: &Ctx) -> String {
    let p = file(c);
    let fd = rw(&p);
    let held = flock(&fd, libc::LOCK_EX);
    let child = proc::in_child(|| {
        let fd = rw(&p);
        arm_interrupt();
        format!("lock_ex={}", show(&flock(&fd, libc::LOCK_EX)))
    });
    format!("hold={} child: {child}", show(&held))
}

//! `fsva-guest`: boots a stock Debian user VM (see `fsva_tests::guest`) against a
//! vhost-user-fs socket, runs a script in it on the mounted device, prints the
//! script's output and exits with its status. The benchmarks use it against fsva and
//! virtiofsd alike; docs/VHOST.md shows it as the recipe for a quick try.
//!
//! Usage: `fsva-guest --socket PATH [--tag TAG] [--cpus N] [--memory MiB]
//!         [--queues N] [--kernel stock|multi-queue] [--timeout SECS]
//!         [--bin PROGRAM]... SCRIPT`
//!
//! `--queues` sets the device's request queues; `--kernel multi-queue` boots the
//! guest kernel that uses several (see `GuestKernel::multi_queue`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fsva_tests::guest::{boot, GuestImage, GuestKernel, GuestSpec};

const USAGE: &str = "usage: fsva-guest --socket PATH [--tag TAG] [--cpus N] [--memory MiB] [--queues N] [--kernel stock|multi-queue] [--timeout SECS] [--bin PROGRAM]... SCRIPT";

fn main() -> ExitCode {
    let mut socket = None;
    let mut tag = "fsva".to_string();
    let mut spec = GuestSpec::new(1, Duration::from_secs(600));
    let mut kernel = None;
    let mut bins: Vec<PathBuf> = Vec::new();
    let mut script = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{a} needs a value\n{USAGE}"))
        };
        let number = |v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| panic!("{v}: not a number\n{USAGE}"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(value())),
            "--tag" => tag = value(),
            "--cpus" => spec.cpus = number(value()) as u32,
            "--memory" => spec.memory_mib = number(value()) as u32,
            "--queues" => spec.request_queues = number(value()) as u32,
            "--kernel" => {
                kernel = Some(match value().as_str() {
                    "stock" => GuestKernel::stock(),
                    "multi-queue" => GuestKernel::multi_queue(),
                    k => panic!("--kernel {k}: stock or multi-queue\n{USAGE}"),
                })
            }
            "--timeout" => spec.limit = Duration::from_secs(number(value())),
            "--bin" => bins.push(PathBuf::from(value())),
            s if !s.starts_with('-') && script.is_none() => script = Some(PathBuf::from(s)),
            _ => panic!("unknown argument {a}\n{USAGE}"),
        }
    }
    let (Some(socket), Some(script)) = (socket, script) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let text = std::fs::read_to_string(&script)
        .unwrap_or_else(|e| panic!("reading {}: {e}", script.display()));
    let bins: Vec<&std::path::Path> = bins.iter().map(PathBuf::as_path).collect();
    let kernel = kernel.unwrap_or_else(GuestKernel::stock);
    let image = GuestImage::build_on(&kernel, &bins, &text);
    let run = boot(&image, &socket, &tag, spec);
    print!("{}", run.output);
    eprintln!("fsva-guest: guest ran {:.1} s", run.elapsed.as_secs_f64());
    match run.exit() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(n.clamp(1, 255) as u8),
        None => {
            eprintln!(
                "fsva-guest: the script did not run; console:\n{}",
                run.console
            );
            ExitCode::FAILURE
        }
    }
}

//! `fsva appliance build|info`: the VM appliance as users see it.

use std::process::ExitCode;

use crate::cli::{AccelArg, VmApplianceCommand};

pub fn run(cmd: VmApplianceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmApplianceCommand::Build(args) => {
            fsva_vm::qemu::check_installed()?;
            let opts = fsva_vm::bundle::BuildOptions {
                kernel: args.kernel,
                modules: args.modules,
                init: crate::vm::runtime_path()?,
            };
            let _lock = crate::vm::lock_cache()?;
            let a = crate::vm::build(&opts)?;
            let (accel, note) = crate::vm::choose_accel(&a, AccelArg::Auto);
            print_info(&a, Some((accel, note)));
        }
        VmApplianceCommand::Info => {
            let _lock = crate::vm::lock_cache()?;
            let a = fsva_vm::bundle::Appliance::load(&crate::vm::cache_dir())?;
            let accel = std::fs::read_to_string(a.dir.join("accel")).ok().map(|t| {
                if t.starts_with("kvm") {
                    (fsva_vm::qemu::Accel::Kvm, "KVM".to_string())
                } else {
                    (
                        fsva_vm::qemu::Accel::Tcg,
                        format!("TCG ({})", t.trim_start_matches("tcg ").trim()),
                    )
                }
            });
            print_info(&a, accel);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_info(a: &fsva_vm::bundle::Appliance, accel: Option<(fsva_vm::qemu::Accel, String)>) {
    let m = &a.manifest;
    println!("appliance:    {}", a.dir.display());
    println!(
        "kernel:       {} (from {})",
        m.kernel_release,
        m.kernel_source.display()
    );
    println!("runtime:      {}", m.init_source.display());
    println!("file systems: {}", m.filesystems.join(" "));
    println!(
        "initramfs:    {:.1} MiB, {} modules",
        m.initrd_bytes as f64 / (1 << 20) as f64,
        m.modules
    );
    match accel {
        Some((_, note)) => println!("accelerator:  {note}"),
        None => println!("accelerator:  not probed yet (the first mount checks KVM)"),
    }
}

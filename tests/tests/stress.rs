//! The stress run at the size CI affords (`cargo xtask stress` runs the full sizes): 20 pod
//! cycles on pangolin and 5 on runc, 8 pods at once on each, each step followed by the leak
//! audit (processes, containerd's descriptors, mounts, sockets, leases, state files, and the
//! host's network namespaces, links, qdiscs, cgroups and memfds: this is the only test of its
//! binary, and `cargo test` runs binaries one at a time).

#![allow(clippy::tests_outside_test_module)] // integration tests live at the top of their file

use std::time::Duration;

use pangolin_e2e::containerd::{PANGOLIN_HANDLER, RUNC_HANDLER};
use pangolin_e2e::stress::{Sizes, Stress};

#[test]
fn pods_cycle_and_start_in_parallel_with_nothing_left_after_each_step() {
    let stress = Stress::new("stress-ci", 63, true);
    let mut report = String::new();
    let mut outcome = Ok(());
    for (handler, cycles) in [(PANGOLIN_HANDLER, 20), (RUNC_HANDLER, 5)] {
        let sizes = Sizes {
            cycles,
            parallel: 8,
            soak: Duration::ZERO,
            soak_workers: 0,
            handlers: vec![handler.to_string()],
            whole_host: true,
        };
        match stress.run(&sizes) {
            Ok(r) => report.push_str(&r.render()),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    stress.finish();
    eprintln!("{report}");
    if let Err(e) = outcome {
        panic!("{e:#}");
    }
}

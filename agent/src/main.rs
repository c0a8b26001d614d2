//! pangolin-agent: PID 1 of the Pangolin microVM. See DESIGN.md.
//!
//! Run with `HELPER_ARG` as argv[1] it is instead the single-threaded libcontainer helper.

use pangolin_agent::{guest, helper};

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(helper::HELPER_ARG) {
        std::process::exit(helper::helper_main(args.next().as_deref()));
    }
    if !guest::is_pid1() {
        eprintln!("pangolin-agent: must run as PID 1 of a Pangolin guest (it mounts and reboots)");
        std::process::exit(2);
    }
    if let Err(err) = guest::run() {
        // PID 1's stderr is the serial console: the only place this can be seen.
        eprintln!("pangolin-agent: fatal: {err:#}");
    }
    // PID 1 must not return (the kernel would panic); end the VM instead.
    guest::power_off();
}

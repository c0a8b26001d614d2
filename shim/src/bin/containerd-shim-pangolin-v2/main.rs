//! `containerd-shim-pangolin-v2`: the containerd shim v2 binary (runtime `io.containerd.pangolin.v2`).
//! Everything is in `pangolin_shim::shimv2`.

use pangolin_shim::shimv2::service::{shim_config, Service};
use pangolin_shim::shimv2::RUNTIME_ID;

fn main() {
    // A pod's network namespace holder (for its OCI hooks) is this binary started again.
    pangolin_shim::network::holder::hold_if_asked();
    run();
}

#[tokio::main]
async fn run() {
    if std::env::args()
        .skip(1)
        .any(|a| a == "-v" || a == "--version" || a == "-version")
    {
        println!("containerd-shim-pangolin-v2:");
        println!("  Runtime: {RUNTIME_ID}");
        println!("  Version: {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    containerd_shim::asynchronous::run::<Service>(RUNTIME_ID, Some(shim_config())).await;
}

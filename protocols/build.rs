//! Generates the agent API's protobuf messages and async ttrpc stubs into OUT_DIR.

use std::{env, fs, io, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> io::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("no OUT_DIR"))?);
    println!("cargo:rerun-if-changed=protos/agent.proto");
    Codegen::new()
        .out_dir(&out)
        .input("protos/agent.proto")
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // `include!` cannot take inner attributes or inner doc comments: drop `#![...]`, demote `//!`.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = fs::read_to_string(&path)?;
        let kept: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#!["))
            .map(|l| l.replacen("//!", "//", 1))
            .collect();
        fs::write(&path, kept.join("\n"))?;
    }
    Ok(())
}

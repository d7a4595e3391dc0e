//! Nothing to generate for pglb itself. `protoc-bin-vendored` is a build dependency only so that
//! cargo downloads a protoc before etcd-client's build script runs it (through `.cargo/protoc`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}

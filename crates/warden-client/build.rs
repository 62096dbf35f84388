//! With the `grpc` feature: generates the gRPC client of `proto/warden/v1` with a pure-Rust
//! protobuf compiler, so that building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
        let files =
            ["jobs.proto", "secrets.proto", "system.proto"].map(|f| root.join("warden/v1").join(f));
        for f in &files {
            println!("cargo:rerun-if-changed={}", f.display());
        }
        let fds = protox::compile(&files, [&root])?;
        tonic_prost_build::configure()
            .build_server(false)
            .build_client(true)
            .bytes(".warden.v1.Output.data")
            .compile_fds(fds)?;
    }
    Ok(())
}

//! Compile proto/ into Rust with protox (pure Rust: no system protoc needed), and save
//! the descriptor set for gRPC server reflection. Only with the `server` feature; etcd's
//! API (client side) with the `cluster` feature.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "server")]
    {
        use prost::Message;
        let proto = "proto/biogate/v1/biogate.proto";
        println!("cargo:rerun-if-changed={proto}");
        let fds = protox::compile([proto], ["proto"])?;
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("biogate_descriptor.bin"), fds.encode_to_vec())?;
        tonic_prost_build::configure().compile_fds(fds)?;
    }
    #[cfg(feature = "cluster")]
    {
        // etcd's v3 API, client side only (the cluster's coordination).
        let proto = "proto/etcd/etcd.proto";
        println!("cargo:rerun-if-changed={proto}");
        let fds = protox::compile([proto], ["proto"])?;
        tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    }
    Ok(())
}

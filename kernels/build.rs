//! What the llama.cpp this crate is linked against can do. The harness
//! checks a source's headers before cargo runs (`harness::builds::llama_source`)
//! and says here, in `QUANTBENCH_LLAMA_LACKS`, which optional parts of
//! the API it lacks; they become cfgs so the crate still compiles against
//! that source, and the features using them say so at run time. The
//! source's identity (`QUANTBENCH_LLAMA_ID`) is compiled in, so a binary
//! itself names the llama.cpp it contains.

fn main() {
    println!("cargo::rerun-if-env-changed=QUANTBENCH_LLAMA_LACKS");
    println!("cargo::rerun-if-env-changed=QUANTBENCH_LLAMA_ID");
    println!("cargo::rustc-check-cfg=cfg(llama_lacks_tensor_overrides)");
    println!("cargo::rustc-check-cfg=cfg(llama_lacks_imatrix_data)");
    println!("cargo::rustc-check-cfg=cfg(llama_lacks_load_mode_enum)");
    let lacks = std::env::var("QUANTBENCH_LLAMA_LACKS").unwrap_or_default();
    for capability in lacks.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match capability {
            "tensor-overrides" => println!("cargo::rustc-cfg=llama_lacks_tensor_overrides"),
            "imatrix-data" => println!("cargo::rustc-cfg=llama_lacks_imatrix_data"),
            "load-mode-enum" => println!("cargo::rustc-cfg=llama_lacks_load_mode_enum"),
            other => panic!(
                "QUANTBENCH_LLAMA_LACKS names `{other}`; known: tensor-overrides, imatrix-data, load-mode-enum"
            ),
        }
    }
    let id = std::env::var("QUANTBENCH_LLAMA_ID").unwrap_or_default();
    println!("cargo::rustc-env=QUANTBENCH_LLAMA_ID={id}");
}

//! Every kernel file compiles with NVRTC for sm_80 and sm_90a, in each precision it is built for, with no register
//! spills.
//! Needs NVRTC and the CUDA headers but no GPU: `.ci/run` installs pip's nvidia-cuda-nvrtc and
//! nvidia-cuda-runtime wheels and points LD_LIBRARY_PATH and CUDA_HOME at them.

use kiln_cuda::compile::Compiler;
use kiln_cuda::kernels::{KERNELS, Precision};

fn compiler(cache: &str) -> Compiler {
    let dir = std::env::temp_dir().join(format!("kiln-nvrtc-test-{}-{cache}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    match Compiler::with_cache_dir(dir) {
        Ok(c) => c,
        Err(e) => panic!(
            "{e}\nThis test needs NVRTC 13 and the CUDA headers: `pip install nvidia-cuda-nvrtc==13.0.88 \
             nvidia-cuda-runtime==13.0.88`, then LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib and \
             CUDA_HOME=<site-packages>/nvidia/cu13 (.ci/run does this)"
        ),
    }
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper_without_spills() {
    let compiler = compiler("all");
    for kernel in KERNELS {
        for arch in ["sm_80", "sm_90a"] {
            for &precision in kernel.precisions {
                let built = compiler.compile(kernel, arch, precision).unwrap_or_else(|e| panic!("{e}"));
                assert!(!built.cached);
                assert!(built.cubin.starts_with(b"\x7fELF"), "{}: not an ELF cubin", kernel.name);
                assert!(!built.stats.is_empty(), "{} {arch}: ptxas reported no kernels", kernel.name);
                // The kernels read from the CUBIN (what the engine loads) are those ptxas reported compiling.
                let mut reported: Vec<&str> = built.stats.iter().map(|s| s.function.as_str()).collect();
                let mut defined: Vec<&str> = built.entry_points.iter().map(String::as_str).collect();
                reported.sort();
                defined.sort();
                assert_eq!(defined, reported, "{} {arch} {}", kernel.name, precision.name());
                for s in &built.stats {
                    assert!(s.registers > 0, "{} {arch}: {s:?}", kernel.name);
                    assert_eq!(
                        (s.spill_stores, s.spill_loads),
                        (0, 0),
                        "{} {arch} {}: spills {s:?}",
                        kernel.name,
                        precision.name()
                    );
                }
                // A second compile is served from the cache, with the same report.
                let again = compiler.compile(kernel, arch, precision).unwrap();
                assert!(again.cached);
                assert_eq!((again.cubin.len(), &again.entry_points), (built.cubin.len(), &built.entry_points));
            }
        }
    }
    let _ = std::fs::remove_dir_all(compiler.cache_dir());
}

#[test]
fn compile_errors_carry_the_compiler_log() {
    let broken = kiln_cuda::kernels::KernelSource {
        name: "broken",
        source: "extern \"C\" __global__ void f() { undefined_thing(); }",
        precisions: &Precision::ALL,
    };
    let err = compiler("broken").compile(&broken, "sm_80", Precision::Fp32).unwrap_err().to_string();
    assert!(err.contains("broken.cu") && err.contains("undefined_thing"), "{err}");
}

#[test]
fn reports_the_version_of_a_library_it_loads() {
    use kiln_cuda::libraries::Library;
    // .ci/run installs NVRTC 13.0.88.
    assert_eq!(Library::Nvrtc.version().as_deref(), Some("13.0"));
    // No machine that runs the tests has the CUDA driver without a GPU; where there is none, there is no version.
    if !Library::Driver.is_present() {
        assert_eq!(Library::Driver.version(), None);
    }
}

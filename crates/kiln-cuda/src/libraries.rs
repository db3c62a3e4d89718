//! The CUDA libraries kiln loads at run time, and a check that they are present.
//!
//! cudarc panics on the first call into a library it cannot load, so every entry point checks here first.

use kiln_core::{Error, Result};

/// A library kiln can load, with how to get it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
    Nccl,
}

impl Library {
    /// Every library kiln can load, in the order `kiln info` lists them.
    pub const ALL: [Library; 5] = [Library::Driver, Library::Nvrtc, Library::Cublas, Library::CublasLt, Library::Nccl];

    pub fn file_name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda.so",
            Library::Nvrtc => "libnvrtc.so.13",
            Library::Cublas => "libcublas.so.13",
            Library::CublasLt => "libcublasLt.so.13",
            Library::Nccl => "libnccl.so",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Library::Driver => {
                "install the NVIDIA driver (the CUDA driver library comes with it); on a machine without an NVIDIA GPU use --backend cpu"
            }
            Library::Nvrtc => {
                "install the CUDA 13 toolkit, or `pip install nvidia-cuda-nvrtc`, and put its lib directory on LD_LIBRARY_PATH"
            }
            Library::Cublas | Library::CublasLt => {
                "install the CUDA 13 toolkit, or `pip install nvidia-cublas`, and put its lib directory on LD_LIBRARY_PATH"
            }
            Library::Nccl => {
                "install NCCL (`pip install nvidia-nccl-cu13` gives libnccl.so.2: link it as libnccl.so in a directory on LD_LIBRARY_PATH)"
            }
        }
    }

    pub fn is_present(self) -> bool {
        // SAFETY: these only try to load the library; they call nothing in it.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
                Library::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Library::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }

    /// Ok when the library can be loaded, otherwise an error naming it and what to install.
    /// The library's version, when it can be loaded: the driver's as the CUDA version it supports.
    pub fn version(self) -> Option<String> {
        use std::ffi::c_int;
        if !self.is_present() {
            return None;
        }
        let (mut major, mut minor, mut patch): (c_int, c_int, c_int) = (0, 0, 0);
        // SAFETY: the library is loaded (checked above), and each call only writes the integers it is given.
        let ok = unsafe {
            match self {
                Library::Driver => {
                    let mut v = 0;
                    let ok = cudarc::driver::sys::cuDriverGetVersion(&mut v)
                        == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS;
                    // The CUDA version it supports: major·1000 + minor·10.
                    (major, minor) = (v / 1000, v % 1000 / 10);
                    ok
                }
                Library::Nvrtc => {
                    use cudarc::nvrtc::sys;
                    sys::nvrtcVersion(&mut major, &mut minor) == sys::nvrtcResult::NVRTC_SUCCESS
                }
                Library::Cublas => {
                    use cudarc::cublas::sys::{self, libraryPropertyType::*};
                    let ok = sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
                    sys::cublasGetProperty(MAJOR_VERSION, &mut major) == ok
                        && sys::cublasGetProperty(MINOR_VERSION, &mut minor) == ok
                        && sys::cublasGetProperty(PATCH_LEVEL, &mut patch) == ok
                }
                Library::CublasLt => {
                    use cudarc::cublaslt::sys::{self, libraryPropertyType::*};
                    let ok = sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
                    sys::cublasLtGetProperty(MAJOR_VERSION, &mut major) == ok
                        && sys::cublasLtGetProperty(MINOR_VERSION, &mut minor) == ok
                        && sys::cublasLtGetProperty(PATCH_LEVEL, &mut patch) == ok
                }
                Library::Nccl => {
                    let mut v = 0;
                    let ok = cudarc::nccl::sys::ncclGetVersion(&mut v) == cudarc::nccl::sys::ncclResult_t::ncclSuccess;
                    // NCCL 2.9 and later: major·10000 + minor·100 + patch.
                    (major, minor, patch) = (v / 10000, v / 100 % 100, v % 100);
                    ok
                }
            }
        };
        if !ok {
            return None;
        }
        // The driver and NVRTC report no patch level.
        Some(match self {
            Library::Driver | Library::Nvrtc => format!("{major}.{minor}"),
            _ => format!("{major}.{minor}.{patch}"),
        })
    }

    pub fn require(self) -> Result<()> {
        if self.is_present() {
            Ok(())
        } else {
            Err(Error::backend("cuda", format!("cannot load {}: {}", self.file_name(), self.install_hint())))
        }
    }
}

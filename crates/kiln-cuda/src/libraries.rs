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
    pub fn require(self) -> Result<()> {
        if self.is_present() {
            Ok(())
        } else {
            Err(Error::backend("cuda", format!("cannot load {}: {}", self.file_name(), self.install_hint())))
        }
    }
}

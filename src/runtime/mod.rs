//! The model runtime: everything that touches tch and the device lives here.
//!
//! - [`model`]: the TorchScript contract, loading, normalisation on the device;
//! - [`batcher`]: the ring of batch slots fit workers write into (dynamic batching);
//! - [`infer`]: the inference worker, one thread per device, and the output ring the
//!   encoders read from.

pub mod batcher;
pub mod cuda;
pub mod infer;
pub mod model;

use tch::Device;

use crate::config::DeviceChoice;

/// Number of CUDA devices libtorch can use here (0 on a machine without a GPU).
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

pub fn to_device(d: DeviceChoice) -> Device {
    match d {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(i) => Device::Cuda(i),
    }
}

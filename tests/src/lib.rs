//! Test support shared by the cross-crate and kernel tests in `tests/tests/`.

pub mod activation;
pub mod audio;
pub mod capture;
pub mod daemon;
pub mod etcd;
pub mod fabric;
pub mod fleet;
pub mod image;
pub mod kernel;
pub mod netns;
pub mod relay;
pub mod support;
pub mod tls;

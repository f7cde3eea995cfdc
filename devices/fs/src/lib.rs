//! virtio-fs device.

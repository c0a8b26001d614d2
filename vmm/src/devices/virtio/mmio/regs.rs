//! Register offsets and bit values of the virtio-mmio version 2 layout (virtio 1.2 section 4.2.2).

/// Size of one device's MMIO window (registers plus configuration space).
pub const WINDOW_SIZE: u64 = 0x1000;

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC_VALUE: u64 = 0x000;
/// `Version`: 2 for the modern layout.
pub const VERSION: u64 = 0x004;
/// `DeviceID`: the virtio device type.
pub const DEVICE_ID: u64 = 0x008;
/// `VendorID`.
pub const VENDOR_ID: u64 = 0x00c;
/// `DeviceFeatures`: the 32-bit word of offered features picked by `DeviceFeaturesSel`.
pub const DEVICE_FEATURES: u64 = 0x010;
/// `DeviceFeaturesSel`.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// `DriverFeatures`: the 32-bit word of accepted features picked by `DriverFeaturesSel`.
pub const DRIVER_FEATURES: u64 = 0x020;
/// `DriverFeaturesSel`.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// `QueueSel`: which queue the queue registers below refer to.
pub const QUEUE_SEL: u64 = 0x030;
/// `QueueNumMax`: largest size the selected queue supports (0: no such queue).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// `QueueNum`: the size the driver chose for the selected queue.
pub const QUEUE_NUM: u64 = 0x038;
/// `QueueReady`: the driver finished configuring the selected queue.
pub const QUEUE_READY: u64 = 0x044;
/// `QueueNotify`: the driver kicks queue number `value` (registered as an ioeventfd).
pub const QUEUE_NOTIFY: u64 = 0x050;
/// `InterruptStatus`.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// `InterruptACK`.
pub const INTERRUPT_ACK: u64 = 0x064;
/// `Status`: the device status byte.
pub const STATUS: u64 = 0x070;
/// `QueueDescLow`.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// `QueueDescHigh`.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// `QueueDriverLow` (available ring).
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
/// `QueueDriverHigh`.
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
/// `QueueDeviceLow` (used ring).
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// `QueueDeviceHigh`.
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// `SHMLenLow`: shared memory regions are not supported, so it reads as all ones.
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// `SHMLenHigh`.
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// `ConfigGeneration`.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE: u64 = 0x100;

/// The value of `MagicValue`.
pub const MAGIC: u32 = 0x7472_6976;
/// The transport version this implementation speaks.
pub const MMIO_VERSION: u32 = 2;
/// Our `VendorID`: 0, no vendor-specific behaviour for the driver to key on.
pub const VENDOR: u32 = 0;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 0x02;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = 0x04;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 0x08;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

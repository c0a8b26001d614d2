//! Legacy PC devices: serial console, i8042 (reset), and the like.

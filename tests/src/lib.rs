//! Shared harness for fsva's end-to-end tests: locating the built binaries, mounting and
//! unmounting fsva on temporary directories, and running the conformance suite as a
//! subprocess. It never stands in for the kernel or an appliance: every helper drives
//! the real `fsva` binary against real FUSE mounts.

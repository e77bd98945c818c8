//! End-to-end tests: the real binary against real worker processes.

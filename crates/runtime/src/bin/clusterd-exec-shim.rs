//! A standalone exec shim (the same code as `clusterd __exec`), used by the runtime's
//! tests and usable with `ShimCommand::program`.
fn main() {
    clusterd_runtime::shim::run_shim(std::env::args_os().skip(1))
}

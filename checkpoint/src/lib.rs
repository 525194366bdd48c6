//! Checkpoint engine (freeze, collect, image, rebuild). Filled in by the checkpoint issue.

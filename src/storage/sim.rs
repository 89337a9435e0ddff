//! The simulated disk (see the module essay of `storage`).

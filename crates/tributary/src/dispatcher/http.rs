//! HTTP dispatch (to be written).

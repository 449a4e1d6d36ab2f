//! Test support: network namespaces, the holdfast binary, temporary unit dirs.

//! Serial allocation (and, with the archive issue, the durable token record).

pub mod serial;

//! What a router and a worker say to each other on top of the Predict call itself:
//! request headers the router sets, and trailers a worker answers with. All are under
//! `x-aspire-`, which the router never forwards from clients nor hands back to them.

/// Request header a router sets on every call it forwards to a worker. Only such
/// requests can get the "version unloading" answer; a client that calls a worker (or
/// `aspire-server`) directly gets NOT_FOUND for a version that is not served.
pub const FORWARDED_HEADER: &str = "x-aspire-forwarded";

/// Trailer of a worker's "version unloading" answer (UNAVAILABLE): the version the
/// router asked for, which this worker is unloading or has unloaded. The router then
/// picks again instead of marking the worker down.
pub const UNLOADING_TRAILER: &str = "x-aspire-unloading";

/// Trailer beside [`UNLOADING_TRAILER`]: the version the worker would serve now to a
/// request that names none, when it has one.
pub const DEFAULT_VERSION_TRAILER: &str = "x-aspire-default-version";

/// The prefix of every header and trailer above; the router drops a client's headers
/// under it and never returns trailers under it.
pub const OWN_PREFIX: &str = "x-aspire-";

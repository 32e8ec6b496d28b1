//! ACME certificates for the whole fleet (issue 7, in progress). [`plan`] is the pure
//! core: for each certificate, keep, order now, or wait (back-off, Retry-After, the
//! CA's rate limits) — with the time of the next look. The orderer (instant-acme), the
//! HTTP-01 responder in the proxies and DNS-01 through [`crate::dns`] come next.

pub mod plan;

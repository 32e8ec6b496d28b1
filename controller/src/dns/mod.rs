//! DNS automation (issue 6, in progress): keep each public name pointing at the live,
//! ready proxy instances. [`plan`] is the pure core: desired state and the records a
//! provider holds → an ordered list of changes, with ownership and a floor. Provider
//! adapters (Route53, RFC 2136, embedded) and the loop that runs them come next.

pub mod plan;

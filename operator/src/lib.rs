//! # Refleet operator
//!
//! The control plane (work in progress): CRD types and the pure planner first; controllers,
//! router and the local backend follow.

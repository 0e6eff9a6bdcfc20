//! The kube backend: controllers that apply the planner's decisions in a cluster
//! (work in progress).

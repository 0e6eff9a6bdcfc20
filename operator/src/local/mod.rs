//! The local backend: reflector child processes on one machine, regions simulated on
//! loopback, driven by the same planner (work in progress).

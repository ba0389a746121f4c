//! The workload suite (issue 15): the same standard load generators against the guest without
//! COLO, beside a twin, on stock COLO and on colo's daemons. Work in progress.

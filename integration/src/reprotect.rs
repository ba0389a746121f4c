//! Online re-protect on the bed (issue 14): after a failover, the survivor keeps serving while
//! a new secondary is brought in with `qmp-driver reprotect`. Work in progress.

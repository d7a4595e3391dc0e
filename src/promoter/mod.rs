//! pglb-promoter: watches the primary and, when it is really gone, promotes the most advanced
//! replica, re-points the others and keeps the old primary fenced. Observe → decide → act.

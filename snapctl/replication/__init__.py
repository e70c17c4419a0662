"""COLO/Remus-style replication: every checkpoint to a standby, failover with nothing lost.

A layer above :mod:`snapctl.checkpoint` (nothing below imports it): ``protocol``
(authenticated, length-bounded framing), ``primary`` (the sender hooked after
each commit, and the output gate), ``standby`` (receiver, committer, warm
memory, failover). See docs/replication.md.
"""

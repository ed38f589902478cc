"""The audit trail: security-relevant events recorded append-only in a hash chain (see recorder.py)."""

from shared.audit.recorder import Actor, record, verify_chain

__all__ = ["Actor", "record", "verify_chain"]

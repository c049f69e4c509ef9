"""Keeping one user's mailbox and calendar current: the per-user sync pipelines the Prefect tasks call."""

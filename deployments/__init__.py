"""Deployments: `prefect.yaml` holds the static ones; per-tenant schedules are generated here (later work)."""

"""Deployments: `prefect.yaml` holds the static templates; the per-tenant deployments are built from the tenant
registry in `deployments.schedules`, served by `o365sync serve` (`deployments.serve`) or registered for workers
(`deployments.register`)."""

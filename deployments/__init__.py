"""Deployments: `prefect.yaml` holds the static templates. For workers, `deployments.register` registers one
deployment per job kind and the dispatchers that create each tenant's runs on its shard's queue
(`deployments.dispatch`); `o365sync serve` (`deployments.serve`) serves per-tenant deployments built from the
tenant registry in `deployments.schedules`."""

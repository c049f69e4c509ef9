"""Prefect flows. Every flow run imports this package first, also when a Prefect worker (not our CLI) starts it:
so this is where such a process makes the files it will write private (o365sync.startup)."""

from o365sync.startup import make_new_files_private

make_new_files_private()

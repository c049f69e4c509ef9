"""The composition layer: the `o365sync` command line, the connect web app and the demo. It wires the library
(o365sync/), the Prefect flows (flows/), the deployments and the simulators together; nothing imports it."""

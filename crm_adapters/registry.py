"""Which module serves which CRM kind. Adding a CRM: one module implementing `base.CrmAdapter` plus one line here
(and the kind in `o365sync.tenants.CRM_KINDS` with its secret names)."""

from __future__ import annotations

from crm_adapters import files, hubspot, pipedrive, salesforce
from o365sync.crm import CrmAdapter

ADAPTERS: dict[str, CrmAdapter] = {
    "salesforce": salesforce,
    "hubspot": hubspot,
    "pipedrive": pipedrive,
    "files": files,
}

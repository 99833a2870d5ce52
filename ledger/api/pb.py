"""Short names for the generated modules (built by `ledger.api.codegen` on package import)."""

from __future__ import annotations

from ledger.api.gen.custody.v1 import (
    account_service_pb2 as account_pb,
)
from ledger.api.gen.custody.v1 import (
    account_service_pb2_grpc as account_grpc,
)
from ledger.api.gen.custody.v1 import (
    alert_service_pb2 as alert_pb,
)
from ledger.api.gen.custody.v1 import (
    alert_service_pb2_grpc as alert_grpc,
)
from ledger.api.gen.custody.v1 import (
    approval_service_pb2 as approval_pb,
)
from ledger.api.gen.custody.v1 import (
    approval_service_pb2_grpc as approval_grpc,
)
from ledger.api.gen.custody.v1 import (
    audit_service_pb2 as audit_pb,
)
from ledger.api.gen.custody.v1 import (
    audit_service_pb2_grpc as audit_grpc,
)
from ledger.api.gen.custody.v1 import (
    audit_trail_pb2 as audit_trail_pb,
)
from ledger.api.gen.custody.v1 import (
    common_pb2 as common_pb,
)
from ledger.api.gen.custody.v1 import (
    customer_service_pb2 as customer_pb,
)
from ledger.api.gen.custody.v1 import (
    customer_service_pb2_grpc as customer_grpc,
)
from ledger.api.gen.custody.v1 import (
    disclosure_service_pb2 as disclosure_pb,
)
from ledger.api.gen.custody.v1 import (
    disclosure_service_pb2_grpc as disclosure_grpc,
)
from ledger.api.gen.custody.v1 import (
    hold_service_pb2 as hold_pb,
)
from ledger.api.gen.custody.v1 import (
    hold_service_pb2_grpc as hold_grpc,
)
from ledger.api.gen.custody.v1 import (
    liabilities_service_pb2 as liabilities_pb,
)
from ledger.api.gen.custody.v1 import (
    liabilities_service_pb2_grpc as liabilities_grpc,
)
from ledger.api.gen.custody.v1 import (
    log_service_pb2 as log_pb,
)
from ledger.api.gen.custody.v1 import (
    log_service_pb2_grpc as log_grpc,
)
from ledger.api.gen.custody.v1 import (
    movement_service_pb2 as movement_pb,
)
from ledger.api.gen.custody.v1 import (
    movement_service_pb2_grpc as movement_grpc,
)
from ledger.api.gen.custody.v1 import (
    platform_service_pb2 as platform_pb,
)
from ledger.api.gen.custody.v1 import (
    platform_service_pb2_grpc as platform_grpc,
)
from ledger.api.gen.custody.v1 import (
    policy_service_pb2 as policy_pb,
)
from ledger.api.gen.custody.v1 import (
    policy_service_pb2_grpc as policy_grpc,
)
from ledger.api.gen.custody.v1 import (
    query_service_pb2 as query_pb,
)
from ledger.api.gen.custody.v1 import (
    query_service_pb2_grpc as query_grpc,
)

SERVICE_MODULES = (
    platform_pb,
    account_pb,
    movement_pb,
    hold_pb,
    query_pb,
    log_pb,
    audit_pb,
    customer_pb,
    policy_pb,
    approval_pb,
    disclosure_pb,
    liabilities_pb,
    alert_pb,
)

# Fully qualified names of every custody.v1 service, for health and reflection.
SERVICE_NAMES: tuple[str, ...] = tuple(
    service.full_name
    for module in SERVICE_MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
)

__all__ = [
    "SERVICE_NAMES",
    "account_grpc",
    "account_pb",
    "alert_grpc",
    "alert_pb",
    "approval_grpc",
    "approval_pb",
    "audit_grpc",
    "audit_pb",
    "audit_trail_pb",
    "common_pb",
    "customer_grpc",
    "customer_pb",
    "disclosure_grpc",
    "disclosure_pb",
    "hold_grpc",
    "hold_pb",
    "liabilities_grpc",
    "liabilities_pb",
    "log_grpc",
    "log_pb",
    "movement_grpc",
    "movement_pb",
    "platform_grpc",
    "platform_pb",
    "policy_grpc",
    "policy_pb",
    "query_grpc",
    "query_pb",
]
